"""WORKER_CONCURRENCY: throughput scaling, CPU and Redis cost per job, and memory of the dyno (issue 9, parts 3 and 6).

    make bench-concurrency                  # = bench/.venv/bin/python bench/concurrency.py
    bench/.venv/bin/python bench/concurrency.py --quick     # small sizes: a minute, for checking the script works

Everything runs on a redis-server of its own (free loopback port, flushed before every run), in this order:

1. Scaling. ``sleep_ms(50)`` jobs (bench/concurrency_jobs.py), WORKER_CONCURRENCY = 1, 2, 4, 8, drained by
   ``python -m worker --burst``; ``--sleep-per-slot`` x N jobs per point. Then RQ's ``rq worker-pool --burst -n N``
   (RQ 2.x, beta) for N = 1, 2, 4 on the same Redis; if the pool cannot drain here, N separate ``rq worker --burst``
   processes instead, and the output says so. jobs/s is net of start-up and shutdown: every point also drains an
   empty queue with the same command, and jobs / (wall(full) - wall(empty)) is the rate. The ratio is that rate over
   N x the single-slot rate of the same runtime in the same run (target >= 0.9 up to N = 8).
2. No-op jobs, N = 1, 2, 4: net jobs/s; CPU per job of the whole dyno (user+sys of the supervisor, the fork server,
   every job child and spare); Redis's CPU per job (``INFO cpu`` used_cpu_user+sys of redis-server, and
   ``INFO commandstats`` usec: script calls counted once, the commands inside them not again), the jobs/s one
   Redis core could serve at that cost, Redis commands executed per job (incl. inside scripts) and, in a separate
   untimed run through bench/latency_proxy.py at 0 added delay, the round trips clients made per job. All per-job
   figures are net of the empty run. Same for RQ's worker-pool (fewer jobs: it is ~10x slower per job). Redis's
   cost per job is compared with the runtime as it was before WORKER_CONCURRENCY (``--baseline-rev``, main at
   9a39a1e, whose cost issue 9 quotes as "about 54 µs"), extracted with ``git archive`` and measured at N = 1 in the
   same run, in ``--pair-rounds`` alternating rounds (median of the per-round ratios): this machine's load moves
   absolute µs by tens of percent, the ratio much less. The N=2 / N=1 speed-up is measured the same way (alternating
   N=1 and N=2 drains of ours).
   CPU accounting: each worker runs under bench/tree_rusage.py, a child subreaper that reaps the whole tree
   (orphans too) and reports getrusage(RUSAGE_CHILDREN). Checked every run by ``spin_ms`` jobs that burn a known
   CPU time in the job children (grandchildren of the wrapper): the tree's net CPU must be >= that.
3. Memory. A generated job module (temp dir, on PYTHONPATH) that holds ``--app-mb`` MB of small Python objects
   (tuples of str/int/float in a module-level list: what gc.freeze is about). The app's own RSS is a plain
   ``python -c 'import bigapp'``. The dyno's PSS is summed over the worker and all its descendants
   (/proc/PID/smaps_rollup). Rows: idle at N = 1, idle at N = 4, and 4 jobs running at N = 4, each job holding
   ``--job-mb`` MB (written page by page) until the benchmark has measured (the jobs push a token to Redis when
   ready and wait for a go). Targets: idle <= 1.25 x app; 4 running <= 1.25 x app + 4 x job allocation.
   Optional: Celery 5.5 prefork ``-c 4`` with the same module (bench/.venv-celery; see --celery).

Prints a report and writes bench/results/concurrency.txt and .json; worker logs go to bench/out/concurrency-logs/.
Every wait is bounded; redis-server and every worker are stopped at the end, also on Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
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
RESULTS = BENCH / "results"
LOGS = BENCH / "out" / "concurrency-logs"
CELERY_PY = BENCH / ".venv-celery" / "bin" / "python"
WORKER_SRC = [REPO]  # where spawned workers import ``worker`` from (--worker-src: A/B against another checkout)
for p in (str(BENCH), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

import redis  # noqa: E402

from worker import config as wconfig  # noqa: E402
from worker import enqueue_many  # noqa: E402
from worker import jobs as wjobs  # noqa: E402
from worker.client import connect  # noqa: E402
from worker.fetch import Broker  # noqa: E402
from tests.support import CONFIG_VARS, descendants, free_port, start_redis_server  # noqa: E402
from latency_proxy import Proxy  # noqa: E402

QUEUE_KEY = "worker:queue:default"
PROCESSED_KEY = "worker:stat:processed"
BENCH_KEYS = ("info", "config|resetstat", "config", "flushall", "rpush", "llen", "blpop")  # ours, in memory runs
REDIS_US_PER_JOB_TODAY = 54.0  # issue 9's figure for main before it (measured on another day): context only
BASELINE_REV = "9a39a1e"  # main before issues 9-15: one slot, claim + ack in one script; the same-run baseline
SOURCES = {}  # runtime -> directory holding the worker/ package its processes import ("ours": WORKER_SRC)

_lines: list = []
_live: list = []  # processes to kill if the benchmark is interrupted


def log(msg: str = "") -> None:
    print(msg, flush=True)
    _lines.append(msg)


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "kernel": platform.release(), "machine": platform.machine()}


def env_for(url: str, src=None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    env.update({"REDIS_URL": url, "QUEUES": "default", "JOB_MODULES": "concurrency_jobs", "LOG_LEVEL": "INFO",
                "PYTHONPATH": os.pathsep.join([str(src or WORKER_SRC[0]), str(REPO), str(BENCH)])})
    env.update({k: str(v) for k, v in extra.items()})
    return env


# --- Redis-side accounting ---

SCRIPT_CALLS = ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro")


def baseline_source(rev: str):
    """``worker/`` as it was at ``rev`` (git archive into bench/out/baseline-<rev>), or None if git cannot give it."""
    dest = BENCH / "out" / f"baseline-{rev}"
    if (dest / "worker" / "__init__.py").exists():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    try:
        arch = subprocess.run(["git", "-C", str(REPO), "archive", rev, "worker"], capture_output=True, timeout=60)
        if arch.returncode == 0:
            subprocess.run(["tar", "-x", "-C", str(dest)], input=arch.stdout, check=True, timeout=60)
            return dest
    except (OSError, subprocess.SubprocessError):
        pass
    shutil.rmtree(dest, ignore_errors=True)
    return None


def ours_like(runtime: str) -> bool:
    """Our runtime, any version: same Redis keys, same enqueue."""
    return runtime in SOURCES


def script_commands() -> set:
    """Command names the runtime's Lua scripts call: their commandstats usec is already inside EVALSHA's."""
    names = set()
    for path in (REPO / "worker").glob("*.py"):
        names |= {m.lower() for m in re.findall(r"redis\.p?call\(\s*['\"]([A-Za-z]+)['\"]", path.read_text())}
    return names


class RedisStats:
    def __init__(self, r, in_scripts: set):
        self.r, self.in_scripts = r, in_scripts

    def reset(self) -> dict:
        self.r.config_resetstat()
        cpu = self.r.info("cpu")
        return {"cpu": cpu["used_cpu_user"] + cpu["used_cpu_sys"]}

    def read(self, before: dict) -> dict:
        cpu = self.r.info("cpu")
        stats = {k.replace("cmdstat_", ""): v for k, v in self.r.info("commandstats").items()}
        stats = {k: v for k, v in stats.items() if k not in BENCH_KEYS}
        scripts = any(k in SCRIPT_CALLS for k in stats)
        usec = sum(v["usec"] for k, v in stats.items() if not (scripts and k in self.in_scripts))
        return {"cpu_s": cpu["used_cpu_user"] + cpu["used_cpu_sys"] - before["cpu"], "cmd_usec": usec,
                "calls": sum(v["calls"] for v in stats.values()),
                "by_command": {k: v["calls"] for k, v in stats.items()}}


# --- runs ---

def tree_run(argv, env, log_path: Path, copies: int = 1, timeout: float = 300.0) -> dict:
    """Run ``argv`` (``copies`` times in parallel) under tree_rusage.py; wall and CPU of the whole tree."""
    out = log_path.with_suffix(".rusage.json")
    with open(log_path, "w") as f:
        p = subprocess.Popen([sys.executable, str(BENCH / "tree_rusage.py"), str(out), str(copies), "--", *argv],
                             env=env, cwd=str(LOGS), stdout=f, stderr=subprocess.STDOUT)
        _live.append(p)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGTERM)  # forwarded to the copies
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        _live.remove(p)
    try:
        res = json.loads(out.read_text())
    except (OSError, ValueError):
        return {"wall": float("nan"), "codes": [p.returncode], "cpu": float("nan"), "orphans": 0,
                "orphan_cpu": 0.0}
    res["cpu"] = res["tree_user"] + res["tree_sys"]
    res["orphan_cpu"] = res["cpu"] - res["main_user"] - res["main_sys"]
    return res


class Bench:
    def __init__(self, args, port: int):
        self.args = args
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.r = redis.Redis(port=port, decode_responses=True)
        self.stats = RedisStats(self.r, script_commands())
        cfg = wconfig.from_mapping({"REDIS_URL": self.url, "QUEUES": "default", "JOB_MODULES": "concurrency_jobs"})
        self.broker = Broker(connect(cfg, name="bench-enqueue"), cfg)
        wjobs.use(self.broker)

    # enqueue + check, per runtime
    def enqueue(self, runtime: str, name: str, n: int, args=()) -> None:
        if not n:
            return
        if ours_like(runtime):
            enqueue_many(name, [list(args)] * n, queue="default")
            return
        from rq import Queue
        import concurrency_jobs
        conn = redis.Redis(port=self.port)
        q = Queue("default", connection=conn)
        fn = getattr(concurrency_jobs, "rq_" + name)
        for i in range(0, n, 500):
            with conn.pipeline() as pipe:
                q.enqueue_many([Queue.prepare_data(fn, args=args) for _ in range(min(500, n - i))], pipeline=pipe)
                pipe.execute()
        conn.close()

    def check(self, runtime: str, n: int) -> str:
        if ours_like(runtime):
            left = self.r.llen(QUEUE_KEY)
            done = int(self.r.get(PROCESSED_KEY) or 0)
            stuck = self.r.keys("worker:processing:*")
            bad = left or done != n or stuck
            return f"left={left} processed={done} processing_lists={len(stuck)}" if bad else ""
        from rq import Queue
        conn = redis.Redis(port=self.port)
        q = Queue("default", connection=conn)
        left, done, failed = q.count, q.finished_job_registry.count, q.failed_job_registry.count
        conn.close()
        return f"left={left} finished={done} failed={failed}" if (left or done != n or failed) else ""

    def argv(self, runtime: str, n_slots: int, url: str):
        if ours_like(runtime):
            return [sys.executable, "-m", "worker", "--burst"], 1
        if runtime == "rq-pool":
            return [sys.executable, "-m", "rq.cli", "worker-pool", "--burst", "-n", str(n_slots), "--url", url,
                    "default"], 1
        return [sys.executable, "-m", "rq.cli", "worker", "--burst", "--url", url, "default"], n_slots  # rq-workers

    def watch(self, runtime: str, n: int, stop: threading.Event, box: dict) -> None:
        """Poll Redis every 5 ms: when the first job left the queue, when the n-th was recorded done."""
        r = redis.Redis(port=self.port, decode_responses=True)
        queue, done = (QUEUE_KEY, lambda: int(r.get(PROCESSED_KEY) or 0)) if ours_like(runtime) else \
            ("rq:queue:default", lambda: r.zcard("rq:finished:default"))
        while not stop.is_set():
            now = time.monotonic()
            if "first" not in box and r.llen(queue) < n:
                box["first"] = now
            if "first" in box and done() >= n:
                box["last"] = time.monotonic()
                break
            time.sleep(0.005)
        r.close()

    def drain(self, runtime: str, name: str, n: int, slots: int, job_args=(), url=None, proxy=None,
              watch=False) -> dict:
        self.r.flushall()
        self.enqueue(runtime, name, n, job_args)
        box, stop = {}, threading.Event()
        watcher = threading.Thread(target=self.watch, args=(runtime, n, stop, box),
                                   daemon=True) if watch and n else None
        if watcher:
            watcher.start()
        url = url or self.url
        argv, copies = self.argv(runtime, slots, url)
        env = env_for(url, SOURCES.get(runtime), WORKER_CONCURRENCY=slots)
        before = self.stats.reset()
        if proxy:
            proxy.command("reset")
        tag = f"{runtime}-{name}-n{slots}-{n}{'-proxy' if proxy else ''}"
        res = tree_run(argv, env, LOGS / f"{tag}.log", copies, self.args.run_timeout)
        if watcher:
            stop.set()
            watcher.join(2)
            res["window"] = box["last"] - box["first"] if "last" in box else None
        res["redis"] = self.stats.read(before)
        if proxy:
            res["proxy"] = proxy.stats()
        res["jobs"] = n
        problem = "" if all(c == 0 for c in res["codes"]) else f"exit codes {res['codes']}"
        if not problem and n:
            problem = self.check(runtime, n)
        res["problem"] = problem or None
        if problem:
            log(f"  !! {runtime} {name} N={slots}: {problem} (log: {LOGS / (tag + '.log')})")
        return res

    def point(self, runtime: str, name: str, n: int, slots: int, job_args=(), repeat: int = 1, watch=False) -> dict:
        """Empty-queue run and full run, ``repeat`` times alternated; medians; per-job figures net of the empty run.
        ``watch``: also time the drain window seen in Redis (first job claimed -> last job recorded)."""
        empties, fulls = [], []
        for _ in range(repeat):
            empties.append(self.drain(runtime, name, 0, slots, job_args))
            fulls.append(self.drain(runtime, name, n, slots, job_args, watch=watch))
        med = lambda runs, f: statistics.median(f(x) for x in runs)  # noqa: E731
        wall_f, wall_e = med(fulls, lambda x: x["wall"]), med(empties, lambda x: x["wall"])
        net = wall_f - wall_e
        cpu = med(fulls, lambda x: x["cpu"]) - med(empties, lambda x: x["cpu"])
        rcpu = med(fulls, lambda x: x["redis"]["cpu_s"]) - med(empties, lambda x: x["redis"]["cpu_s"])
        rus = med(fulls, lambda x: x["redis"]["cmd_usec"]) - med(empties, lambda x: x["redis"]["cmd_usec"])
        calls = med(fulls, lambda x: x["redis"]["calls"]) - med(empties, lambda x: x["redis"]["calls"])
        problems = [x["problem"] for x in empties + fulls if x["problem"]]
        windows = [x["window"] for x in fulls if x.get("window")]
        window = statistics.median(windows) if windows else None
        return {
            "window_s": window, "window_jobs_per_s": n / window if window else None,
            "runtime": runtime, "job": name, "slots": slots, "jobs": n, "repeat": repeat,
            "wall_s": wall_f, "startup_s": wall_e, "walls_s": [round(x["wall"], 3) for x in fulls],
            "raw_jobs_per_s": n / wall_f, "jobs_per_s": n / net if net > 0 else n / wall_f,
            "cpu_s": cpu, "cpu_ms_per_job": 1000 * cpu / n, "cpu_cores_busy": cpu / net if net > 0 else None,
            "orphans": max(x["orphans"] for x in fulls), "orphan_cpu_s": max(x["orphan_cpu"] for x in fulls),
            "redis_cpu_us_per_job": 1e6 * rcpu / n, "redis_cmd_us_per_job": rus / n,
            "redis_calls_per_job": calls / n,
            "redis_by_command": {k: round(v / n, 2) for k, v in fulls[-1]["redis"]["by_command"].items()
                                 if v / n >= 0.01},
            "problem": problems[0] if problems else None,
        }

    def round_trips(self, runtime: str, name: str, n: int, slots: int, proxy) -> dict:
        """Client commands and request/response turns per job, counted by the proxy (net of an empty run)."""
        e = self.drain(runtime, name, 0, slots, url=proxy.url, proxy=proxy)
        f = self.drain(runtime, name, n, slots, url=proxy.url, proxy=proxy)
        pe, pf = e["proxy"], f["proxy"]
        return {"sent_per_job": (pf["commands"] - pe["commands"]) / n, "turns_per_job": (pf["turns"] - pe["turns"]) / n,
                "connections_per_job": (pf["connections"] - pe["connections"]) / n, "jobs": n,
                "problem": f["problem"] or e["problem"]}


def terminate(p, wait: float = 30.0) -> None:
    """SIGTERM ``p``, wait for it, SIGKILL it if it is still there; forget it."""
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(wait)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    if p in _live:
        _live.remove(p)


# --- 1. scaling ---

def rq_pool_works(b: Bench) -> tuple:
    """Can ``rq worker-pool --burst`` drain a few jobs here? (It is beta in RQ 2.x.)"""
    res = b.drain("rq-pool", "noop", 6, 2)
    return res["problem"] is None and res["wall"] < 60, res["problem"] or ""


def scaling(b: Bench, args, rq_runtime: str) -> dict:
    log(f"\n1. SCALING: sleep_ms({args.sleep_ms}) jobs, {args.sleep_per_slot} x N per point, drained with --burst. "
        f"jobs/s = jobs / drain window seen in Redis (first job claimed -> last recorded, polled every 5 ms); "
        f"'net' = jobs / (wall - wall of an empty-queue run), for comparison")
    log(f"   ideal per slot = 1000 / {args.sleep_ms} ms = {1000 / args.sleep_ms:.1f} jobs/s, minus each runtime's "
        f"own per-job cost")
    hdr = f"   {'runtime':<26} {'N':>2} {'jobs':>5} {'wall s':>7} {'empty s':>7} {'window s':>8} {'jobs/s':>8}" \
          f" {'net/s':>7} {'÷ N×1-slot':>11} {'target':>7} {'CPU ms/job':>10}"
    log(hdr)
    out = {"ours": [], rq_runtime: []}
    for runtime, ns, label in (("ours", args.slots, "ours (python -m worker)"),
                               (rq_runtime, args.rq_slots, "rq worker-pool -n N" if rq_runtime == "rq-pool"
                                else "N x rq worker")):
        base = None
        for n in ns:
            jobs = args.sleep_per_slot * n
            pt = b.point(runtime, "sleep_ms", jobs, n, job_args=(args.sleep_ms,), repeat=args.repeat, watch=True)
            rate = pt["window_jobs_per_s"] or pt["jobs_per_s"]
            base = base or rate
            pt["ratio"] = rate / (n * base)
            pt["met"] = pt["ratio"] >= 0.9 if runtime == "ours" else None
            tgt = ("MET" if pt["met"] else "MISSED") if runtime == "ours" and n > 1 else ""
            log(f"   {label:<26} {n:>2} {jobs:>5} {pt['wall_s']:>7.2f} {pt['startup_s']:>7.2f} "
                f"{pt['window_s'] or float('nan'):>8.2f} {rate:>8.1f} {pt['jobs_per_s']:>7.1f} {pt['ratio']:>10.2f}x "
                f"{tgt:>7} {pt['cpu_ms_per_job']:>10.1f}"
                + (f"   !! {pt['problem']}" if pt["problem"] else ""))
            out[runtime].append(pt)
    return out


# --- 2. no-op cost ---

def noop_cost(b: Bench, args, rq_runtime: str) -> dict:
    log("\n2. NO-OP JOBS: CPU per job of the whole dyno (every process, from rusage) and of Redis; net of an "
        "empty-queue run")
    out = {"ours": [], rq_runtime: [], "before": [], "check": None}
    spin = b.point("ours", "spin_ms", args.spin_jobs, 1, job_args=(args.spin_ms,))
    expect = args.spin_jobs * args.spin_ms / 1000
    spin_ok = spin["cpu_s"] >= 0.97 * expect
    out["check"] = {"jobs": args.spin_jobs, "ms": args.spin_ms, "expected_cpu_s": expect, "tree_cpu_s": spin["cpu_s"],
                    "counted_all": spin_ok, "orphans": spin["orphans"]}
    log(f"   method check: {args.spin_jobs} spin_ms({args.spin_ms}) jobs burn {expect:.2f} CPU-s in the job children; "
        f"the tree measured {spin['cpu_s']:.2f} CPU-s net ({spin['cpu_s'] - expect:+.2f} s runtime overhead) -> "
        f"{'grandchildren counted' if spin_ok else 'CPU MISSING: method broken'}; orphans reaped by the subreaper "
        f"per run: {spin['orphans']} ({1000 * spin['orphan_cpu_s']:.1f} ms CPU)")
    log(f"   {'runtime':<24} {'N':>2} {'jobs':>5} {'jobs/s':>7} {'vs N=1':>6} {'CPU ms/job':>10} {'cores':>5} "
        f"{'redis µs/job':>12} {'cmdstat µs':>10} {'jobs/s/redis core':>17} {'cmds/job':>8} {'sent/job':>8} "
        f"{'RTs/job':>7}")
    proxy = Proxy(b.port, 0)
    _live.append(proxy.proc)
    try:
        before = [("before", [1], f"ours before #9 ({args.baseline_rev})", args.noop_jobs)] \
            if "before" in SOURCES else []
        for runtime, ns, label, n_jobs in (*before, ("ours", args.noop_slots, "ours", args.noop_jobs),
                                           (rq_runtime, args.rq_noop_slots,
                                            "rq worker-pool" if rq_runtime == "rq-pool" else "rq workers",
                                            args.rq_noop_jobs)):
            base = None
            for n in ns:
                pt = b.point(runtime, "noop", n_jobs, n, repeat=args.repeat)
                rt = b.round_trips(runtime, "noop", max(50, n_jobs // 4), n, proxy)
                pt.update({"round_trips": rt})
                base = base or pt["jobs_per_s"]
                pt["vs_n1"] = pt["jobs_per_s"] / base
                us = pt["redis_cpu_us_per_job"]
                pt["jobs_per_s_per_redis_core"] = 1e6 / us if us > 0 else None
                log(f"   {label:<24} {n:>2} {n_jobs:>5} {pt['jobs_per_s']:>7.0f} {pt['vs_n1']:>5.2f}x "
                    f"{pt['cpu_ms_per_job']:>10.2f} {pt['cpu_cores_busy'] or 0:>5.2f} {us:>12.1f} "
                    f"{pt['redis_cmd_us_per_job']:>10.1f} {pt['jobs_per_s_per_redis_core'] or 0:>17,.0f} "
                    f"{pt['redis_calls_per_job']:>8.2f} {rt['sent_per_job']:>8.2f} {rt['turns_per_job']:>7.2f}"
                    + (f"   !! {pt['problem'] or rt['problem']}" if pt["problem"] or rt["problem"] else ""))
                out[runtime].append(pt)
        if 1 in args.noop_slots and 2 in args.noop_slots and args.pair_rounds > 0:
            out["n2_vs_n1"] = n2_vs_n1(b, args)
        if "before" in SOURCES:
            out["vs_before"] = redis_vs_before(b, args)
    finally:
        proxy.stop()
        _live.remove(proxy.proc)
    log("   CPU ms/job: user+sys of every process of the dyno / jobs; cores: that CPU / drain time; redis µs/job: "
        "redis-server used_cpu_user+sys; cmdstat µs: INFO commandstats usec (script calls once); cmds/job: commands "
        "executed by Redis incl. inside scripts; sent/job and RTs/job: commands sent and round trips made by "
        "clients, counted by bench/latency_proxy.py in a separate run at 0 added delay")
    return out


def n2_vs_n1(b: Bench, args) -> dict:
    """How much faster two slots drain no-ops than one: ``--pair-rounds`` rounds, each an N=1 and an N=2 drain of
    the same jobs (order alternating), the median of the per-round ratios. The rows above run each N once, minutes
    apart; on this VM that alone moved the ratio between 1.14x and 1.43x for the same code."""
    rounds = []
    for i in range(args.pair_rounds):
        order = (1, 2) if i % 2 == 0 else (2, 1)
        pts = {n: b.point("ours", "noop", args.noop_jobs, n) for n in order}
        rounds.append({"n1": pts[1]["jobs_per_s"], "n2": pts[2]["jobs_per_s"],
                       "ratio": pts[2]["jobs_per_s"] / pts[1]["jobs_per_s"]})
    med = statistics.median(r["ratio"] for r in rounds)
    log(f"   no-op drain rate N=2 / N=1, {len(rounds)} alternating rounds of {args.noop_jobs}: " + "; ".join(
        f"{r['n1']:.0f} -> {r['n2']:.0f}/s ({r['ratio']:.2f}x)" for r in rounds) + f" (median {med:.2f}x)")
    return {"rounds": rounds, "median": med}


def redis_vs_before(b: Bench, args) -> dict:
    """Redis's cost per job, ours / before issue 9, at N = 1: ``--pair-rounds`` rounds, each draining the same
    no-ops with one then the other (order alternating), so that a change of machine load hits both; the median of
    the per-round ratios is the figure."""
    rounds = []
    for i in range(args.pair_rounds):
        order = ("before", "ours") if i % 2 == 0 else ("ours", "before")
        pts = {rt: b.point(rt, "noop", args.noop_jobs, 1) for rt in order}
        rounds.append({k: pts["ours"][k] / pts["before"][k] if pts["before"][k] > 0 else float("nan")
                       for k in ("redis_cmd_us_per_job", "redis_cpu_us_per_job")}
                      | {"before": {k: pts["before"][k] for k in ("redis_cmd_us_per_job", "redis_cpu_us_per_job")},
                         "ours": {k: pts["ours"][k] for k in ("redis_cmd_us_per_job", "redis_cpu_us_per_job")}})
    med = {k: statistics.median(r[k] for r in rounds) for k in ("redis_cmd_us_per_job", "redis_cpu_us_per_job")}
    log(f"   Redis cost per job at N=1, ours / before #9, {len(rounds)} alternating rounds of {args.noop_jobs} "
        f"no-ops: cmdstat " + " ".join(f"{r['redis_cmd_us_per_job']:.2f}x" for r in rounds)
        + f" (median {med['redis_cmd_us_per_job']:.2f}x); used_cpu "
        + " ".join(f"{r['redis_cpu_us_per_job']:.2f}x" for r in rounds)
        + f" (median {med['redis_cpu_us_per_job']:.2f}x)")
    log("   µs/job per round (before -> ours), cmdstat: " + "; ".join(
        f"{r['before']['redis_cmd_us_per_job']:.0f} -> {r['ours']['redis_cmd_us_per_job']:.0f}" for r in rounds)
        + "   used_cpu: " + "; ".join(
        f"{r['before']['redis_cpu_us_per_job']:.0f} -> {r['ours']['redis_cpu_us_per_job']:.0f}" for r in rounds))
    return {"rounds": rounds, "median": med}


# --- 3. memory ---

APP_TEMPLATE = '''\
"""Generated by bench/concurrency.py: a stand-in for a big app, {mb} MB of small Python objects at module level."""
import os
import socket

from worker import job

DATA = [("k%d" % i, i, float(i)) for i in range({n})]


def _redis(*args):
    """One Redis command over a plain socket (RESP): no redis-py import, so the job allocates only its buffer."""
    url = os.environ.get("BENCH_REDIS") or os.environ["REDIS_URL"]
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=130) as s:
        s.sendall(b"*%d\\r\\n" % len(args) + b"".join(b"$%d\\r\\n%s\\r\\n" % (len(a), a) for a in args))
        s.recv(4096)


@job
def hold(mb, token):
    """Allocate ``mb`` MB (written page by page), tell the benchmark through Redis, wait for its go, return."""
    buf = bytearray(mb << 20)
    for i in range(0, len(buf), 4096):
        buf[i] = 1
    _redis(b"RPUSH", b"bench:ready", token.encode())
    _redis(b"BLPOP", b"bench:go:" + token.encode(), b"120")
    return len(buf)
'''

CELERY_TEMPLATE = '''\
"""Generated by bench/concurrency.py: Celery's side of the memory table (same app module)."""
import os

from celery import Celery

import bigapp  # noqa: F401  (the app: imported once by the prefork parent)

app = Celery("bigapp_celery", broker=os.environ["CELERY_BROKER"])


@app.task(name="hold")
def hold(mb, token):
    return bigapp.hold(mb, token)
'''


def smaps(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in ("Rss:", "Pss:"):
                    out[parts[0][:-1].lower()] = int(parts[1]) / 1024.0
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            out["cmd"] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return {}
    return out


def tree_memory(root: int) -> dict:
    procs = []
    for pid in [root] + descendants(root):
        m = smaps(pid)
        if m:
            m["pid"] = pid
            procs.append(m)
    return {"pss_mb": sum(p.get("pss", 0) for p in procs), "rss_mb": sum(p.get("rss", 0) for p in procs),
            "processes": procs}


def plain_rss(env, code: str) -> float:
    script = code + "\nimport re\nprint(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return int(out.stdout.split()[-1]) / 1024.0


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def settle(root: int, min_procs: int, timeout: float = 30.0) -> None:
    """Wait until the tree has at least ``min_procs`` processes and its PSS stops moving (allocation finished)."""
    wait_for(lambda: len(descendants(root)) + 1 >= min_procs, timeout, f"{min_procs} processes")
    last, deadline = -1.0, time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = tree_memory(root)["pss_mb"]
        if abs(now - last) < 0.5:
            return
        last = now


def ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat[stat.rindex(")") + 2:].split()[1])
    except (OSError, ValueError):
        return 0


def role(cmd: str, root_pid: int, pid: int, runtime: str) -> str:
    if pid == root_pid:
        return "supervisor" if runtime == "ours" else "celery parent"
    if runtime != "ours":
        return "pool child"
    return "fork server" if ppid(pid) == root_pid else "child"


def memory(b: Bench, args, tmp: str) -> dict:
    log(f"\n3. MEMORY: job module holding ~{args.app_mb} MB of small Python objects; PSS summed over every process "
        f"of the dyno (/proc/PID/smaps_rollup)")
    n_objs = int(args.app_mb * 1e6 / 184)  # ~184 bytes per (str, int, float) tuple and its list slot, measured
    (Path(tmp) / "bigapp.py").write_text(APP_TEMPLATE.format(mb=args.app_mb, n=n_objs))
    (Path(tmp) / "bigapp_celery.py").write_text(CELERY_TEMPLATE)
    env = env_for(b.url, JOB_MODULES="bigapp")
    env["PYTHONPATH"] = os.pathsep.join([tmp, env["PYTHONPATH"]])
    base_rss = plain_rss(env, "import worker")
    app_rss = plain_rss(env, "import bigapp")
    log(f"   app's own RSS (python -c 'import bigapp'): {app_rss:.0f} MB  (interpreter + worker package alone: "
        f"{base_rss:.0f} MB; the objects: {app_rss - base_rss:.0f} MB)")
    rows = []

    def row(label, m, limit, runtime="ours", root=None):
        ratio = m["pss_mb"] / app_rss
        met = m["pss_mb"] <= limit if limit else None
        per = ", ".join(f"{role(p['cmd'], root, p['pid'], runtime)} {p.get('pss', 0):.0f}"
                        for p in m["processes"])
        log(f"   {label:<34} {len(m['processes']):>5} {m['rss_mb']:>9.0f} {m['pss_mb']:>9.0f} {ratio:>7.2f}x "
            f"{(f'<= {limit:.0f}' if limit else ''):>9} {('' if met is None else 'MET' if met else 'MISSED'):>7}")
        log(f"      PSS MB by process: {per}")
        rows.append({"row": label, "runtime": runtime, "processes": len(m["processes"]), "rss_sum_mb": m["rss_mb"],
                     "pss_mb": m["pss_mb"], "x_app": ratio, "limit_mb": limit, "met": met,
                     "by_process": [{"role": role(p["cmd"], root, p["pid"], runtime), "pss_mb": p.get("pss"),
                                     "rss_mb": p.get("rss")} for p in m["processes"]]})

    log(f"   {'row':<34} {'procs':>5} {'RSS sum':>9} {'PSS MB':>9} {'÷ app':>8} {'target':>9} {'':>7}")
    idle_limit = 1.25 * app_rss
    run_limit = 1.25 * app_rss + 4 * args.job_mb
    for n in (1, 4):
        b.r.flushall()
        p = subprocess.Popen([sys.executable, "-m", "worker"], env=dict(env, WORKER_CONCURRENCY=str(n)),
                             cwd=str(LOGS), stdout=open(LOGS / f"memory-n{n}.log", "w"), stderr=subprocess.STDOUT)
        _live.append(p)
        try:
            logf = LOGS / f"memory-n{n}.log"
            wait_for(lambda: "worker.start" in logf.read_text() or p.poll() is not None, 120, "worker.start")
            if p.poll() is not None:
                raise RuntimeError(f"worker exited: {logf.read_text()[-2000:]}")
            settle(p.pid, 3)  # supervisor, fork server, spare
            fs = [q for q in tree_memory(p.pid)["processes"] if "worker.forkserver" in q["cmd"]]
            if fs and n == 1:
                log(f"   (fork server's own RSS: {fs[0].get('rss', 0):.0f} MB, PSS {fs[0].get('pss', 0):.0f} MB)")
            row(f"idle, WORKER_CONCURRENCY={n}", tree_memory(p.pid), idle_limit, root=p.pid)
            if n == 4:
                enqueue_many("hold", [[args.job_mb, f"t{i}"] for i in range(4)], queue="default")
                wait_for(lambda: b.r.llen("bench:ready") >= 4, 60, "4 jobs holding their memory")
                settle(p.pid, 6)
                row(f"4 jobs x {args.job_mb} MB running, N=4", tree_memory(p.pid), run_limit, root=p.pid)
                for i in range(4):
                    b.r.rpush(f"bench:go:t{i}", 1)
                wait_for(lambda: int(b.r.get(PROCESSED_KEY) or 0) >= 4, 60, "the 4 jobs to finish")
        finally:
            terminate(p)
    if args.celery and CELERY_PY.exists():
        try:
            celery_rows(b, args, env, app_rss, row)
        except Exception as exc:  # optional comparison: report and carry on
            log(f"   Celery: failed ({type(exc).__name__}: {exc}); see {LOGS}")
    elif args.celery:
        log(f"   Celery: skipped ({CELERY_PY} does not exist; make bench-concurrency-celery creates it)")
    log(f"   targets: idle <= 1.25 x app = {idle_limit:.0f} MB; 4 running <= 1.25 x app + 4 x {args.job_mb} MB "
        f"= {run_limit:.0f} MB")
    return {"app_rss_mb": app_rss, "interpreter_rss_mb": base_rss, "objects": n_objs, "job_mb": args.job_mb,
            "rows": rows}


def celery_rows(b: Bench, args, env, app_rss, row) -> None:
    cenv = dict(env, CELERY_BROKER=b.url.rsplit("/", 1)[0] + "/1")
    r1 = redis.Redis(port=b.port, db=1)
    r1.flushdb()
    p = subprocess.Popen([str(CELERY_PY), "-m", "celery", "-A", "bigapp_celery", "worker", "-P", "prefork", "-c", "4",
                          "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"],
                         env=cenv, cwd=str(LOGS), stdout=open(LOGS / "memory-celery.log", "w"),
                         stderr=subprocess.STDOUT)
    _live.append(p)
    try:
        logf = LOGS / "memory-celery.log"
        wait_for(lambda: "ready." in logf.read_text() or p.poll() is not None, 120, "celery ready")
        settle(p.pid, 5)
        row("Celery prefork -c 4, idle", tree_memory(p.pid), None, runtime="celery", root=p.pid)
        b.r.delete("bench:ready")
        send = ("from celery import Celery; app = Celery(broker=%r)\n"
                "for i in range(4): app.send_task('hold', args=[%d, 'c%%d' %% i])" % (cenv["CELERY_BROKER"], args.job_mb))
        subprocess.run([str(CELERY_PY), "-c", send], env=cenv, check=True, timeout=60, capture_output=True)
        wait_for(lambda: b.r.llen("bench:ready") >= 4, 60, "4 celery jobs holding their memory")
        settle(p.pid, 5)
        row(f"Celery -c 4, 4 jobs x {args.job_mb} MB running", tree_memory(p.pid), None, runtime="celery",
            root=p.pid)
        for i in range(4):
            b.r.rpush(f"bench:go:c{i}", 1)
    finally:
        terminate(p)


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (about a minute): check that it all works")
    ap.add_argument("--slots", default="1,2,4,8", help="WORKER_CONCURRENCY values for the scaling table")
    ap.add_argument("--rq-slots", default="1,2,4", help="rq worker-pool -n values for the scaling table")
    ap.add_argument("--sleep-ms", type=int, default=50)
    ap.add_argument("--sleep-per-slot", type=int, default=40, help="sleep jobs per point = this x N")
    ap.add_argument("--noop-slots", default="1,2,4")
    ap.add_argument("--rq-noop-slots", default="1,2,4")
    ap.add_argument("--noop-jobs", type=int, default=3000)
    ap.add_argument("--rq-noop-jobs", type=int, default=300)
    ap.add_argument("--spin-jobs", type=int, default=100)
    ap.add_argument("--spin-ms", type=int, default=10)
    ap.add_argument("--app-mb", type=int, default=200)
    ap.add_argument("--job-mb", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=1, help="runs per point (median)")
    ap.add_argument("--no-celery", dest="celery", action="store_false", help="skip Celery in the memory table")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: scaling,noop,memory")
    ap.add_argument("--run-timeout", type=float, default=300.0)
    ap.add_argument("--pair-rounds", type=int, default=3,
                    help="alternating rounds: Redis cost vs --baseline-rev, and the N=2 / N=1 no-op speed-up")
    ap.add_argument("--baseline-rev", default=BASELINE_REV,
                    help="git revision of the runtime whose Redis cost per job ours is compared with ('' = none)")
    ap.add_argument("--worker-src", default=str(REPO),
                    help="directory holding the worker/ package the spawned workers run (default: this checkout)")
    args = ap.parse_args(argv)
    WORKER_SRC[0] = Path(args.worker_src).resolve()
    SOURCES["ours"] = WORKER_SRC[0]
    if args.quick:
        args.sleep_per_slot, args.noop_jobs, args.rq_noop_jobs = 10, 300, 60
        args.spin_jobs, args.app_mb, args.pair_rounds = 30, 50, 1
    for k in ("slots", "rq_slots", "noop_slots", "rq_noop_slots"):
        setattr(args, k, [int(x) for x in getattr(args, k).split(",") if x.strip()])
    skip = set(filter(None, args.skip.split(",")))
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(LOGS, ignore_errors=True)
    LOGS.mkdir(parents=True)

    signal.signal(signal.SIGTERM, _interrupted)
    tmp = tempfile.mkdtemp(prefix="bench-concurrency-")
    port = free_port()
    server = start_redis_server(port, tmp)
    try:
        import rq
        m = machine()
        rv = redis.Redis(port=port).info("server")["redis_version"]
        cmd = "make bench-concurrency" if not (argv or sys.argv[1:]) else \
            " ".join(["bench/.venv/bin/python bench/concurrency.py", *(argv or sys.argv[1:])])
        load = os.getloadavg()
        meta = dict(m, redis_server=rv, redis_py=redis.__version__, rq=rq.__version__, command=cmd,
                    loadavg_start=load, started=time.strftime("%Y-%m-%d %H:%M:%S %z"))
        log(f"command: {cmd}")
        log(f"machine: {m['nproc']} cpus ({m['cpu_model']}), {m['machine']}, Linux {m['kernel']}; "
            f"python {m['python']}; redis-server {rv}; redis-py {redis.__version__}; rq {rq.__version__}")
        src = WORKER_SRC[0]
        rev = subprocess.run(["git", "-C", str(src), "log", "-1", "--format=%h %s"], capture_output=True,
                             text=True).stdout.strip()
        meta["worker_src"], meta["worker_rev"] = str(src), rev
        log(f"worker package: {src}/worker" + (f" (git {rev[:60]})" if rev else ""))
        log(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
            + ("  (other processes are using the CPUs: figures are noisy)" if load[0] > 0.5 * (m["nproc"] or 1)
               else ""))
        if args.baseline_rev and "noop" not in skip:
            base_src = baseline_source(args.baseline_rev)
            if base_src:
                SOURCES["before"] = base_src
            log(f"baseline for Redis cost per job: git {args.baseline_rev} (main before issue 9) "
                + (f"in {base_src}" if base_src else "NOT AVAILABLE (git archive failed): no same-run ratio"))
        b = Bench(args, port)
        result = {"meta": meta, "args": vars(args)}

        rq_runtime = "rq-pool"
        ok, why = rq_pool_works(b)
        if not ok:
            rq_runtime = "rq-workers"
            log(f"rq worker-pool --burst did not drain 6 jobs here ({why}); RQ figures use N separate "
                f"`rq worker --burst` processes instead")
        result["rq_runtime"] = rq_runtime
        if "scaling" not in skip:
            result["scaling"] = scaling(b, args, rq_runtime)
        if "noop" not in skip:
            result["noop"] = noop_cost(b, args, rq_runtime)
        if "memory" not in skip:
            result["memory"] = memory(b, args, tmp)
        result["targets"] = summarize(result, args)
        meta["loadavg_end"] = os.getloadavg()
        log(f"\nload average at end: {meta['loadavg_end'][0]:.2f}; worker logs in {LOGS}")
        (RESULTS / "concurrency.json").write_text(json.dumps(result, indent=2))
        (RESULTS / "concurrency.txt").write_text("\n".join(_lines) + "\n")
        print(f"wrote {RESULTS / 'concurrency.txt'} and {RESULTS / 'concurrency.json'}")
        return 0
    finally:
        for p in list(_live):
            if p.poll() is None:
                p.kill()
        server.kill()
        server.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def summarize(result: dict, args) -> list:
    checks = []

    def check(name, value, target, met):
        checks.append({"check": name, "value": value, "target": target, "met": met})
        log(f"   {name:<58} {value:>10}   target {target:<28} {'MET' if met else 'MISSED'}")

    log("\nTARGETS")
    sc = result.get("scaling", {}).get("ours", [])
    for pt in sc[1:]:
        check(f"scaling N={pt['slots']}: jobs/s / (N x single-slot)", f"{pt['ratio']:.2f}", ">= 0.90", pt["met"])
    no = result.get("noop", {}).get("ours", [])
    if no:
        base = no[0]["cpu_ms_per_job"]
        for pt in no[1:]:
            check(f"no-op CPU per job, N={pt['slots']} vs N=1", f"{pt['cpu_ms_per_job'] / base:.2f}x",
                  "<= ~1.05x (does not grow)", pt["cpu_ms_per_job"] <= 1.05 * base)
        two = next((p for p in no if p["slots"] == 2), None)
        pair = result["noop"].get("n2_vs_n1")
        if pair:  # alternating rounds: the same-moment ratio
            check("no-op drain rate, N=2 / N=1 (median of rounds)", f"{pair['median']:.2f}x", ">= 1.2x",
                  pair["median"] >= 1.2)
        elif two:
            check("no-op drain rate, N=2 / N=1", f"{two['vs_n1']:.2f}x", ">= 1.2x", two["vs_n1"] >= 1.2)
        vs = result["noop"].get("vs_before")
        if vs:  # same run, alternating rounds: the ratio is the figure; the 54 µs is context
            for key, what in (("redis_cmd_us_per_job", "cmdstat"), ("redis_cpu_us_per_job", "used_cpu")):
                ratio = vs["median"][key]
                check(f"Redis {what} µs/job, N=1, ours / before #9 (median)", f"{ratio:.2f}x",
                      "<= 1.0x (#9); <= 1.2x (#12)", ratio <= 1.2)
        else:
            for pt in no:
                check(f"Redis CPU per job (used_cpu), N={pt['slots']}", f"{pt['redis_cpu_us_per_job']:.1f} µs",
                      f"<= ~{REDIS_US_PER_JOB_TODAY:.0f} µs", pt["redis_cpu_us_per_job"] <= REDIS_US_PER_JOB_TODAY * 1.05)
        for pt in no:
            rts = pt["round_trips"]["turns_per_job"]
            check(f"client round trips per job (proxy), N={pt['slots']}", f"{rts:.2f}", "<= ~1", rts <= 1.05)
        chk = result["noop"]["check"]
        check("CPU accounting counts the job children (spin check)",
              f"{chk['tree_cpu_s']:.2f}/{chk['expected_cpu_s']:.2f}s", ">= 1.0 of the burnt CPU", chk["counted_all"])
    for r in result.get("memory", {}).get("rows", []):
        if r["met"] is not None:
            check(f"memory: {r['row']}", f"{r['pss_mb']:.0f} MB", f"<= {r['limit_mb']:.0f} MB", r["met"])
    return checks


if __name__ == "__main__":
    sys.exit(main())
