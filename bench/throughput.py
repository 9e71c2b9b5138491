"""Throughput of the fork-per-job worker against RQ 2.12's fork-per-job Worker and the bare fork limit (issue 6).

    make bench-throughput                      # = bench/.venv/bin/python bench/throughput.py
    bench/.venv/bin/python bench/throughput.py --jobs 2000 --rq-jobs 400 --rq-rtt-jobs 100 --rtts 0,1,2,5

What runs (all on a redis-server of its own, on a free loopback port, flushed before every run):

* ours:  N ``noop`` jobs enqueued with ``worker.enqueue_many`` (timed: bulk enqueue jobs/s), then
         ``python -m worker --burst`` (QUEUES=default, JOB_MODULES=worker.sample, LOG_LEVEL=INFO) drains them.
* RQ:    M jobs enqueued with ``Queue.enqueue_many`` in one pipeline (not timed), then ``rq worker --burst``
         (``rq.Worker``: fork per job, default pickle serializer) drains them.
* fork:  ``os.fork()`` + ``os._exit(0)`` + ``os.waitpid`` in a loop, in a Python process with redis-py imported.

Each drain is timed from process start to exit. The same command is also run on an empty queue, and the net rate
N / (wall(N) - wall(empty)) - startup and shutdown removed, the same way for both runtimes - is the figure that the
ratios and targets use; the raw rate is printed beside it. Then ours and RQ run again behind bench/latency_proxy.py
(delay added each way, calibrated until the median PING round trip is the target RTT), for each RTT in ``--rtts``.
Last, ``--before-rounds`` alternating local rounds of ours against our own runtime before issue 9 (``git archive`` of
``--baseline-rev``, as bench/concurrency.py does): the same-run ratio says whether single-slot speed regressed.

Per job: Redis calls from ``INFO commandstats`` (CONFIG RESETSTAT before each run; these count the commands a Lua
script runs as well as the EVALSHA itself), and, behind the proxy, the commands clients actually sent and their
request/response turns (= round trips for a synchronous client) and new connections. All per-job figures have the
empty run subtracted.
Peak RSS: the worker process's VmHWM (sampled from /proc while it runs).

Writes bench/out/throughput.json and bench/out/throughput.png (jobs/s against RTT); logs in bench/out/logs/.
Every wait is bounded; redis-server and the proxies are stopped at the end, also on Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OUT = BENCH / "out"
for p in (str(BENCH), str(REPO)):  # the runtime (worker/) and RQ's job module (rq_jobs.py) import from here
    if p not in sys.path:
        sys.path.insert(0, p)

import redis  # noqa: E402

from worker import config as wconfig  # noqa: E402
from worker import enqueue_many  # noqa: E402
from worker import jobs as wjobs  # noqa: E402
from worker.client import connect  # noqa: E402
from worker.fetch import Broker  # noqa: E402
from tests.support import free_port, start_redis_server  # noqa: E402
from latency_proxy import Proxy  # noqa: E402
import worker.sample  # noqa: E402,F401  (registers noop)

# Config variables of the runtime: stripped from the environment of spawned workers, so a developer's shell (or a
# .env, hence cwd = a temp dir) cannot change what is measured.
CONFIG_VARS = ("REDIS_URL", "QUEUES", "JOB_MODULES", "TERM_TIMEOUT", "TERM_GRACE", "SHUTDOWN_WINDOW", "JOB_TIMEOUT",
               "JOB_RETRIES", "MAX_ATTEMPTS", "HEARTBEAT_INTERVAL", "HEARTBEAT_TTL", "FAILED_MAX", "FAILED_TTL",
               "MAX_PAYLOAD_BYTES", "KEY_PREFIX", "LOG_LEVEL", "DYNO", "REDIS_TLS_VERIFY", "REDIS_TIMEOUT",
               "WORKER_CONCURRENCY", "JOB_MAX_MEMORY_MB", "RESULT_TTL", "MAX_INTERRUPTIONS", "METRICS_INTERVAL")

TARGETS = {
    "local_vs_rq": 6.0,        # ours / RQ, local Redis
    "local_vs_fork": 0.7,      # ours / bare fork loop
    "rtt_vs_rq": 10.0,         # ours / RQ at ~2 ms RTT
    "round_trips_per_job": 1.0,
    "enqueue_per_s": 20000.0,
    "vs_before": 0.95,         # ours / the runtime before issue 9, same run: nothing regresses (within noise)
}
SOURCES: dict = {}  # runtime -> the directory its ``worker`` package is imported from (default: this checkout)

FORK_LIMIT = r"""
import os, sys, time
import redis  # same import weight as a worker process
n = int(sys.argv[1])
t = time.perf_counter()
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
print(n / (time.perf_counter() - t))
"""


def log(msg: str) -> None:
    print(msg, flush=True)


class RedisServer:
    def __init__(self, workdir: str):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = start_redis_server(self.port, workdir)
        client = redis.Redis(port=self.port)
        self.version = client.info("server")["redis_version"]
        client.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def ping_rtt_ms(url: str, n: int = 200) -> float:
    r = redis.Redis.from_url(url)
    try:
        r.ping()
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            r.ping()
            samples.append(time.perf_counter() - t)
        return statistics.median(samples) * 1000
    finally:
        r.close()


def calibrate(proxy: Proxy, target_ms: float) -> tuple:
    """Adjust the one-way delay until the median PING RTT through the proxy is within 5% of ``target_ms``."""
    delay = target_ms / 2
    rtt = ping_rtt_ms(proxy.url)
    for _ in range(6):
        if abs(rtt - target_ms) <= 0.05 * target_ms:
            break
        delay = max(0.0, delay - (rtt - target_ms) / 2)
        proxy.command(f"delay {delay:.4f}")
        rtt = ping_rtt_ms(proxy.url)
    return delay, rtt


def child_env(url: str, src=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    env.update({"REDIS_URL": url, "QUEUES": "default", "JOB_MODULES": "worker.sample", "LOG_LEVEL": "INFO",
                "PYTHONPATH": os.pathsep.join([str(src or REPO), str(BENCH)])})
    return env


_live: list = []  # processes to kill if the benchmark is interrupted


def _vmhwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run_timed(argv, env, cwd: str, log_path: Path, timeout: float) -> dict:
    """Run ``argv`` to completion: wall seconds from spawn to reaped exit, exit code, peak RSS.

    Peak RSS is the process's VmHWM, sampled from /proc while it runs (high-water marks only grow, so the last
    sample is the peak up to then). Not wait4's ru_maxrss: after an exec from a forked copy of this (larger)
    process, that figure keeps the pre-exec image's RSS.
    """
    with open(log_path, "w") as out:
        t0 = time.monotonic()
        p = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        _live.append(p)
        timer = threading.Timer(timeout, p.kill)  # bound: a stuck worker is killed, and reported as failed
        timer.daemon = True
        timer.start()
        done, peak = threading.Event(), [0]

        def sample():
            while not done.wait(0.02):
                peak[0] = max(peak[0], _vmhwm_kb(p.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # exited but not reaped: the pid stays its own
            wall = time.monotonic() - t0
        finally:
            timer.cancel()
            done.set()
            sampler.join(1)
        _, status = os.waitpid(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        _live.remove(p)
    return {"wall": wall, "code": p.returncode, "rss_mb": peak[0] / 1024.0}


def commandstats(r) -> dict:
    own = ("info", "config|resetstat", "config")  # the benchmark's own calls
    return {k[len("cmdstat_"):] if k.startswith("cmdstat_") else k: v["calls"]
            for k, v in r.info("commandstats").items() if k.replace("cmdstat_", "") not in own}


def fork_limit(jobs: int) -> float:
    out = subprocess.run([sys.executable, "-c", FORK_LIMIT, str(jobs)], capture_output=True, text=True,
                         timeout=120, check=True)
    return float(out.stdout)


# --- the two runtimes ---

def ours_cfg(url: str):
    return wconfig.from_mapping({"REDIS_URL": url, "QUEUES": "default", "JOB_MODULES": "worker.sample"})


def ours_enqueue(url: str, n: int) -> float:
    """Bulk enqueue ``n`` noop jobs with worker.enqueue_many; returns the seconds it took."""
    cfg = ours_cfg(url)
    broker = Broker(connect(cfg, name="enqueue"), cfg)
    wjobs.use(broker)
    broker.r.ping()  # connect and load nothing else inside the timed part
    t = time.perf_counter()
    ids = enqueue_many("noop", [()] * n)
    dt = time.perf_counter() - t
    assert len(ids) == n
    broker.r.close()
    return dt


def ours_check(r, n: int) -> str:
    left = r.llen("worker:queue:default")
    processed = int(r.get("worker:stat:processed") or 0)
    stuck = r.keys("worker:processing:*")
    if left or processed != n or stuck:
        return f"left={left} processed={processed} processing_lists={len(stuck)}"
    return ""


def rq_enqueue(url: str, n: int) -> float:
    from rq import Queue
    import rq_jobs
    conn = redis.Redis.from_url(url)
    q = Queue("default", connection=conn)
    t = time.perf_counter()
    with conn.pipeline() as pipe:
        q.enqueue_many([Queue.prepare_data(rq_jobs.noop) for _ in range(n)], pipeline=pipe)
        pipe.execute()
    dt = time.perf_counter() - t
    assert q.count == n
    conn.close()
    return dt


def rq_check(url: str, n: int) -> str:
    from rq import Queue
    conn = redis.Redis.from_url(url)
    q = Queue("default", connection=conn)
    left, done, failed = q.count, q.finished_job_registry.count, q.failed_job_registry.count
    conn.close()
    if left or done != n or failed:
        return f"left={left} finished={done} failed={failed}"
    return ""


class Bench:
    def __init__(self, args, server: RedisServer, workdir: str):
        self.args, self.server, self.workdir = args, server, workdir
        self.r = redis.Redis(port=server.port, decode_responses=True)
        self.logs = OUT / "logs"
        shutil.rmtree(self.logs, ignore_errors=True)  # this run's logs only
        self.logs.mkdir(parents=True)

    def drain(self, runtime: str, n: int, url: str, proxy, tag: str) -> dict:
        """Enqueue ``n`` jobs (untimed for the drain), run the runtime's burst worker, measure and verify."""
        self.r.flushall()
        enqueue_s = None
        ours_like = runtime in ("ours", "before")  # "before": our runtime as it was at --baseline-rev
        if n:
            if ours_like:
                enqueue_s = ours_enqueue(self.server.url, n)
            else:
                rq_enqueue(self.server.url, n)
        if ours_like:
            argv = [sys.executable, "-m", "worker", "--burst"]
        else:
            argv = [sys.executable, "-m", "rq.cli", "worker", "--burst", "--url", url, "default"]
        self.r.config_resetstat()
        if proxy:
            proxy.command("reset")
        res = run_timed(argv, child_env(url, SOURCES.get(runtime)), self.workdir, self.logs / f"{runtime}-{tag}-{n}.log",
                        self.args.run_timeout)
        res["calls"] = commandstats(self.r)
        res["proxy"] = proxy.stats() if proxy else None
        res["jobs"] = n
        res["enqueue_s"] = enqueue_s
        problem = "" if res["code"] == 0 else f"exit code {res['code']}"
        if not problem and n:
            problem = ours_check(self.r, n) if ours_like else rq_check(self.server.url, n)
        res["problem"] = problem or None
        if problem:
            log(f"  !! {runtime} {tag}: {problem} (log: {self.logs / f'{runtime}-{tag}-{n}.log'})")
        return res

    def point(self, runtime: str, n: int, url: str, proxy, tag: str, repeat: int = 1, between=None) -> dict:
        """Empty-queue runs (startup/shutdown cost) and runs with ``n`` jobs, alternated ``repeat`` times; medians.
        Per-job figures are net of the empty run. ``between`` is called before each full run (fork-limit probes)."""
        empties, fulls = [], []
        for _ in range(repeat):
            empties.append(self.drain(runtime, 0, url, proxy, tag))
            if between:
                between()
            fulls.append(self.drain(runtime, n, url, proxy, tag))
        if between:
            between()
        empty, full = empties[-1], fulls[-1]
        wall_full = statistics.median(f["wall"] for f in fulls)
        wall_empty = statistics.median(e["wall"] for e in empties)
        net_s = wall_full - wall_empty
        calls_full, calls_empty = sum(full["calls"].values()), sum(empty["calls"].values())
        per_cmd = {k: (v - empty["calls"].get(k, 0)) / n for k, v in full["calls"].items()}
        problems = [x["problem"] for x in empties + fulls if x["problem"]]
        out = {
            "runtime": runtime, "jobs": n, "repeat": repeat, "wall_s": wall_full, "startup_s": wall_empty,
            "walls_s": [round(f["wall"], 3) for f in fulls], "startups_s": [round(e["wall"], 3) for e in empties],
            "raw_jobs_per_s": n / wall_full, "net_jobs_per_s": n / net_s if net_s > 0 else n / wall_full,
            "server_calls_per_job": (calls_full - calls_empty) / n,
            "server_calls_by_command": dict(sorted(((k, round(v, 3)) for k, v in per_cmd.items() if v > 0.005),
                                                   key=lambda kv: -kv[1])),
            "peak_rss_mb": max(f["rss_mb"] for f in fulls), "problem": problems[0] if problems else None,
        }
        enq = [f["enqueue_s"] for f in fulls if f["enqueue_s"]]
        if enq:
            out["enqueue_jobs_per_s"] = n / statistics.median(enq)
        if proxy:
            pf, pe = full["proxy"], empty["proxy"]
            out["client_commands_per_job"] = (pf["commands"] - pe["commands"]) / n
            out["round_trips_per_job"] = (pf["turns"] - pe["turns"]) / n
            out["connections_per_job"] = (pf["connections"] - pe["connections"]) / n
        return out


def same_run_before(bench: "Bench", args, url: str):
    """Single-slot throughput against our runtime before issue 9 (``git archive`` of ``--baseline-rev``, as
    bench/concurrency.py does), local Redis, in alternating rounds: this machine's load moves absolute rates by tens
    of percent between runs, so only a same-run ratio can say whether anything regressed."""
    if args.before_rounds <= 0:
        return None
    from concurrency import BASELINE_REV, baseline_source
    rev = args.baseline_rev or BASELINE_REV
    src = baseline_source(rev)
    if src is None:
        log(f"cannot extract git {rev} with git archive: no comparison with the runtime before issue 9")
        return None
    SOURCES["before"] = src
    log(f"single slot against the runtime before issue 9 (git {rev}), {args.before_rounds} alternating rounds of "
        f"{args.jobs} no-ops, local Redis ...")
    rounds = []
    for i in range(args.before_rounds):
        order = ("before", "ours") if i % 2 == 0 else ("ours", "before")
        pts = {rt: bench.point(rt, args.jobs, url, None, "pair") for rt in order}
        r = {rt: pts[rt]["net_jobs_per_s"] for rt in order}
        rounds.append(dict(r, ratio=r["ours"] / r["before"], problems=[pts[rt]["problem"] for rt in order]))
        log(f"  round {i + 1}: before {r['before']:,.1f}/s  ours {r['ours']:,.1f}/s  ours/before {rounds[-1]['ratio']:.2f}")
    return {"rev": rev, "rounds": rounds, "ratio_median": statistics.median(r["ratio"] for r in rounds)}


def fmt_rate(x) -> str:
    return f"{x:10,.1f}" if x is not None else "       n/a"


def print_row(label: str, p: dict) -> None:
    extra = ""
    if "round_trips_per_job" in p:
        extra = (f"  sent {p['client_commands_per_job']:5.2f}  turns {p['round_trips_per_job']:5.2f}"
                 f"  new conns {p['connections_per_job']:4.2f}")
    log(f"  {label:<22} {p['jobs']:6d} jobs  wall {p['wall_s']:7.2f}s (startup {p['startup_s']:.2f}s)  "
        f"raw {fmt_rate(p['raw_jobs_per_s'])}/s  net {fmt_rate(p['net_jobs_per_s'])}/s  "
        f"redis calls/job {p['server_calls_per_job']:6.2f}{extra}  peak RSS {p['peak_rss_mb']:.0f} MB")


def plot(points: list, fork: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for runtime, label, style in (("ours", "this worker (fork per job)", "o-"), ("rq", "RQ 2.12 Worker", "s-")):
        xs = [pt["rtt_ms"] for pt in points]
        ys = [pt[runtime]["net_jobs_per_s"] for pt in points]
        ax.plot(xs, ys, style, label=label)
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:,.0f}", (x, y), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.axhline(fork, linestyle="--", color="grey", label=f"bare fork+exit+waitpid loop ({fork:,.0f}/s)")
    ax.plot([], [], " ", label="green: ours / RQ")
    for pt in points:
        ratio = pt["ours"]["net_jobs_per_s"] / pt["rq"]["net_jobs_per_s"]
        mid = (pt["ours"]["net_jobs_per_s"] * pt["rq"]["net_jobs_per_s"]) ** 0.5  # halfway on the log axis
        ax.annotate(f"{ratio:.1f}x", (pt["rtt_ms"], mid), ha="center", fontsize=9, color="tab:green")
    ax.set_yscale("log")
    ax.set_xlabel("Redis round-trip time, ms (median PING; 0 = direct loopback)")
    ax.set_ylabel("no-op jobs/s, one worker process (net of startup)")
    ax.set_title("Fork-per-job throughput against Redis latency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Throughput of this worker against RQ 2.12 and the fork limit.")
    ap.add_argument("--jobs", type=int, default=2000, help="no-op jobs per run for this worker (every RTT)")
    ap.add_argument("--rq-jobs", type=int, default=400, help="jobs per run for RQ with local Redis")
    ap.add_argument("--rq-rtt-jobs", type=int, default=100, help="jobs per run for RQ behind the proxy")
    ap.add_argument("--rtts", default="0,1,2,5", help="target round-trip times in ms (0 = direct, no proxy)")
    ap.add_argument("--headline-rtt", type=float, default=2.0, help="the RTT the '~2 ms' target is checked at")
    ap.add_argument("--enqueue-jobs", type=int, default=20000, help="jobs in the bulk-enqueue measurement")
    ap.add_argument("--local-repeat", type=int, default=3, help="runs per runtime with local Redis (median)")
    ap.add_argument("--run-timeout", type=float, default=300.0, help="seconds before a worker run is killed")
    ap.add_argument("--before-rounds", type=int, default=3,
                    help="alternating local rounds against the runtime before issue 9 (0 = skip)")
    ap.add_argument("--baseline-rev", default=None, help="git revision of that runtime (default: bench/concurrency.py's)")
    args = ap.parse_args(argv)
    rtts = sorted({float(x) for x in args.rtts.split(",") if x.strip()})
    OUT.mkdir(parents=True, exist_ok=True)

    # SIGTERM (e.g. from make's caller) unwinds like Ctrl-C, so the finally below stops every server.
    signal.signal(signal.SIGTERM, _interrupted)
    workdir = tempfile.mkdtemp(prefix="bench-throughput-")
    server = RedisServer(workdir)
    proxies = []
    try:
        import rq
        meta = {"python": platform.python_version(), "redis_server": server.version, "redis_py": redis.__version__,
                "rq": rq.__version__, "cpus": os.cpu_count(), "machine": platform.machine(),
                "command": " ".join([Path(sys.executable).name, "bench/throughput.py", *(argv or sys.argv[1:])])}
        meta["loadavg_start"] = os.getloadavg()
        log(f"redis-server {server.version} on port {server.port}; python {meta['python']}; rq {meta['rq']}; "
            f"{meta['cpus']} cpus; load average {meta['loadavg_start'][0]:.2f}")
        if meta["loadavg_start"][0] > 0.5 * (os.cpu_count() or 1):
            log("  note: other processes are using the CPUs; fork-bound figures will be low and noisy")
        bench = Bench(args, server, workdir)

        fork_n = max(300, min(args.jobs, 1000))
        log(f"fork limit (os.fork + os._exit + waitpid x {fork_n}, redis imported), 3 runs ...")
        forks = [fork_limit(fork_n) for _ in range(3)]
        log("  " + ", ".join(f"{x:,.0f}" for x in forks) + " forks/s")
        local_forks = []  # probes right before and after each local run of ours: same machine load as the run

        log(f"bulk enqueue: worker.enqueue_many('noop', ...) x {args.enqueue_jobs}, median of 3 ...")
        enq = []
        for _ in range(3):
            bench.r.flushall()
            enq.append(args.enqueue_jobs / ours_enqueue(server.url, args.enqueue_jobs))
        bench.r.flushall()
        enqueue_rate = statistics.median(enq)
        rq_enq = 1000 / rq_enqueue(server.url, 1000)
        bench.r.flushall()
        log(f"  ours {enqueue_rate:,.0f} jobs/s   (RQ Queue.enqueue_many, 1000 jobs in one pipeline: {rq_enq:,.0f}/s)")

        points = []
        for target in rtts:
            proxy = None
            if target <= 0:
                url, delay, rtt = server.url, 0.0, ping_rtt_ms(server.url)
                tag = "local"
            else:
                proxy = Proxy(server.port, target / 2)
                proxies.append(proxy)
                delay, rtt = calibrate(proxy, target)
                url, tag = proxy.url, f"rtt{target:g}ms"
            log(f"RTT {rtt:.2f} ms ({'direct' if proxy is None else f'proxy, {delay:.2f} ms each way'}) ...")
            ours = bench.point("ours", args.jobs, url, proxy, tag, repeat=args.local_repeat if proxy is None else 1,
                               between=(lambda: local_forks.append(fork_limit(fork_n))) if proxy is None else None)
            print_row("ours", ours)
            if proxy is None and local_forks:
                log("  fork limit around these runs: " + ", ".join(f"{x:,.0f}" for x in local_forks) + " forks/s")
            rq_n = args.rq_jobs if proxy is None else args.rq_rtt_jobs
            theirs = bench.point("rq", rq_n, url, proxy, tag, repeat=args.local_repeat if proxy is None else 1)
            print_row("RQ", theirs)
            points.append({"target_rtt_ms": target, "rtt_ms": rtt, "one_way_delay_ms": delay, "ours": ours,
                           "rq": theirs})
            if proxy:
                proxy.stop()

        before = same_run_before(bench, args, server.url)

        fork = statistics.median(forks + local_forks)
        fork_local = statistics.median(local_forks) if local_forks else fork
        # round trips per job implied by latency sensitivity: d(seconds per job) / d(RTT)
        base = points[0] if points and points[0]["target_rtt_ms"] <= 0 else None
        for pt in (points[1:] if base else []):
            for rt in ("ours", "rq"):
                d_rtt = (pt["rtt_ms"] - base["rtt_ms"]) / 1000
                if d_rtt > 0 and pt[rt]["net_jobs_per_s"] and base[rt]["net_jobs_per_s"]:
                    pt[rt]["latency_round_trips_per_job"] = \
                        (1 / pt[rt]["net_jobs_per_s"] - 1 / base[rt]["net_jobs_per_s"]) / d_rtt

        local = next((p for p in points if p["target_rtt_ms"] <= 0), None)
        remote = [p for p in points if p["target_rtt_ms"] > 0]
        head = min(remote, key=lambda p: abs(p["target_rtt_ms"] - args.headline_rtt)) if remote else None
        checks = []

        def check(name, value, target, ok, unit=""):
            checks.append({"check": name, "value": value, "target": target, "met": bool(ok)})
            return f"  {name:<44} {value:10.2f}{unit}   target {target}   {'MET' if ok else 'MISSED'}"

        lines = ["", "targets (rates net of startup; raw rates above):"]
        if local:
            ours_r = local["ours"]["net_jobs_per_s"]
            lines.append(check("local: ours / RQ", ours_r / local["rq"]["net_jobs_per_s"], ">= 6x",
                               ours_r / local["rq"]["net_jobs_per_s"] >= TARGETS["local_vs_rq"], "x"))
            lines.append(check("local: ours / fork limit (probed around the runs)", ours_r / fork_local, ">= 0.7",
                               ours_r / fork_local >= TARGETS["local_vs_fork"]))
        if head:
            ratio = head["ours"]["net_jobs_per_s"] / head["rq"]["net_jobs_per_s"]
            lines.append(check(f"RTT {head['rtt_ms']:.2f} ms: ours / RQ", ratio, ">= 10x",
                               ratio >= TARGETS["rtt_vs_rq"], "x"))
            rts = head["ours"]["round_trips_per_job"]
            lines.append(check(f"RTT {head['rtt_ms']:.2f} ms: ours round trips per job (proxy)", rts, "<= ~1",
                               rts <= TARGETS["round_trips_per_job"] + 0.05))
            lines.append(f"  {'   (RQ round trips per job, same proxy)':<44} {head['rq']['round_trips_per_job']:10.2f}")
        if before:
            lines.append(check(f"local: ours / before #9 ({before['rev']}), same run", before["ratio_median"],
                               f">= {TARGETS['vs_before']} (median of {len(before['rounds'])} rounds)",
                               before["ratio_median"] >= TARGETS["vs_before"]))
        lines.append(check("bulk enqueue (worker.enqueue_many), jobs/s", enqueue_rate, ">= 20,000",
                           enqueue_rate >= TARGETS["enqueue_per_s"]))
        for line in lines:
            log(line)
        if remote and base:
            log("\nround trips per job implied by latency (d seconds-per-job / d RTT):  " + "  ".join(
                f"{p['rtt_ms']:.1f}ms ours {p['ours'].get('latency_round_trips_per_job', float('nan')):.2f} "
                f"rq {p['rq'].get('latency_round_trips_per_job', float('nan')):.1f}" for p in remote))

        meta["loadavg_end"] = os.getloadavg()
        result = {"meta": meta, "args": vars(args), "fork_limit_per_s": fork, "fork_limit_local_per_s": fork_local,
                  "fork_limit_samples": forks + local_forks, "enqueue_jobs_per_s": enqueue_rate,
                  "rq_enqueue_jobs_per_s": rq_enq, "points": points, "vs_before": before, "targets": checks}
        (OUT / "throughput.json").write_text(json.dumps(result, indent=2))
        plot(points, fork, OUT / "throughput.png")
        log(f"\nwrote {OUT / 'throughput.json'} and {OUT / 'throughput.png'}")
        problems = [p[rt]["problem"] for p in points for rt in ("ours", "rq") if p[rt]["problem"]]
        problems += [x for r in (before or {}).get("rounds", []) for x in r["problems"] if x]
        return 1 if problems else 0
    finally:
        for p in list(_live):
            p.kill()
        for proxy in proxies:
            proxy.stop()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
