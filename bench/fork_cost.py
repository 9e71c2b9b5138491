"""Where a no-op job's CPU goes, and what the kernel and CPython charge for a fork alone (issue 9's N=2 / N=1 figure).

    bench/.venv/bin/python bench/fork_cost.py            # about 2 minutes
    bench/.venv/bin/python bench/fork_cost.py --rounds 5 --jobs 3000 --seconds 3
    bench/.venv/bin/python bench/fork_cost.py --baseline 92e2a36 --rounds 6   # what a change costs per job

1. Drain: ``--jobs`` no-op jobs (``concurrency_jobs.noop``) drained by ``python -m worker --burst`` at N = 1 and N = 2
   slots, ``--rounds`` alternating rounds, each net of an empty-queue run. CPU per job of each process of the dyno
   (from /proc, sampled every 20 ms until it exits): the supervisor, the fork server, the job children (the fork
   server's cutime + cstime), and redis-server (INFO cpu); and how many of the machine's cores they kept busy.
2. Fork floor: ``os.fork()`` + ``os._exit(0)`` in the child + ``os.waitpid`` in a loop for ``--seconds``, in a fresh
   process that first imports nothing; ``threading`` (whose after-fork handler every child runs); what our fork
   server imports (``worker.child``, ``worker.jobs``, the job module, then ``gc.freeze``); and that plus redis-py
   (an app that uses Redis). CPU per fork of the parent and of the child, the parent's RSS and mappings.

A job can cost no less than its fork's floor; N slots can at best turn the cores that N = 1 leaves idle into
throughput. Prints a table; writes nothing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(BENCH), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

import redis  # noqa: E402

from worker import config as wconfig  # noqa: E402
from worker.fetch import Broker  # noqa: E402
from tests.support import free_port, start_redis_server  # noqa: E402

TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list:
    """utime, stime, cutime, cstime of ``pid`` in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    return [int(x) / TCK for x in s[s.rindex(")") + 2:].split()[11:15]]


def _children(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def baseline_source(rev: str) -> Path:
    """``worker/`` as it was at ``rev`` (git archive into bench/out/fork-baseline-<rev>)."""
    dest = BENCH / "out" / f"fork-baseline-{rev}"
    if not (dest / "worker" / "__init__.py").exists():
        dest.mkdir(parents=True, exist_ok=True)
        arch = subprocess.run(["git", "-C", str(REPO), "archive", rev, "worker"], capture_output=True, check=True,
                              timeout=60)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=arch.stdout, check=True, timeout=60)
    return dest


def drain(url: str, port: int, n: int, slots: int, src: Path = REPO) -> dict:
    """``src``: the tree whose ``worker`` package runs (the worker is started there: its cwd comes first)."""
    r = redis.Redis(port=port, decode_responses=True)
    r.flushall()
    if n:
        cfg = wconfig.from_mapping({"REDIS_URL": url})
        Broker(redis.Redis(port=port, decode_responses=True), cfg).push_many("noop", [[] for _ in range(n)])
    env = dict(os.environ, WORKER_CONCURRENCY=str(slots), REDIS_URL=url, QUEUES="default",
               JOB_MODULES="concurrency_jobs", LOG_LEVEL="INFO", PYTHONPATH=os.pathsep.join([str(src), str(BENCH)]))
    cpu0 = r.info("cpu")
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "worker", "--burst"], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, cwd=str(src))
    last: dict = {}
    while p.poll() is None:  # the last sample before each process exits (its own and its reaped children's CPU)
        try:
            last["sup"] = _stat(p.pid)
            for k in _children(p.pid):
                with open(f"/proc/{k}/cmdline") as f:
                    if "forkserver" in f.read():
                        last["fs"] = _stat(k)
        except OSError:
            pass
        time.sleep(0.02)
    wall = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"the worker exited with {p.returncode}")
    cpu1 = r.info("cpu")
    red = cpu1["used_cpu_user"] + cpu1["used_cpu_sys"] - cpu0["used_cpu_user"] - cpu0["used_cpu_sys"]
    return {"wall": wall, "sup": sum(last["sup"][:2]), "fs": sum(last["fs"][:2]), "child": sum(last["fs"][2:]),
            "redis": red}


FORK_LOOP = r"""
import gc, os, resource, sys, time
what, seconds = sys.argv[1], float(sys.argv[2])
if what in ("threading", "server", "server+redis"):
    import threading
if what in ("server", "server+redis"):
    from worker import child, jobs
    jobs.import_modules(["concurrency_jobs"])
    if what == "server+redis":
        import redis
    gc.freeze()
c0, s0 = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
n, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    n += 1
c1, s1 = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
cpu = lambda a, b: (b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime) * 1000 / n
rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
print(n / seconds, cpu(s0, s1), cpu(c0, c1), rss, len(open("/proc/self/maps").readlines()))
"""


def fork_floor(what: str, seconds: float) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(BENCH)]))
    out = subprocess.run([sys.executable, "-c", FORK_LOOP, what, str(seconds)], env=env, capture_output=True,
                         text=True, timeout=seconds + 60, check=True).stdout.split()
    rate, parent, child, rss, maps = (float(x) for x in out)
    return {"rate": rate, "parent": parent, "child": child, "rss": rss, "maps": maps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each fork loop")
    ap.add_argument("--baseline", metavar="REV",
                    help="instead: drain at N=1 with this tree and with worker/ as at git REV, alternating rounds, "
                         "and print the per-job CPU and rate ratios (ours / REV)")
    args = ap.parse_args(argv)
    if args.baseline:
        return compare(args.baseline, args.rounds, args.jobs)
    print(f"machine: {os.cpu_count()} cpus; python {sys.version.split()[0]}; load {os.getloadavg()[0]:.2f}")
    print(f"\n1. DRAIN of {args.jobs} no-ops, {args.rounds} alternating rounds, net of an empty run (medians)")
    keys = ("sup", "fs", "child", "redis")
    res: dict = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        srv = start_redis_server(port, tmp)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            for i in range(args.rounds):
                for slots in ((1, 2) if i % 2 == 0 else (2, 1)):
                    e, f = drain(url, port, 0, slots), drain(url, port, args.jobs, slots)
                    d = {k: f[k] - e[k] for k in f}
                    res[slots].append({"rate": args.jobs / d["wall"],
                                       **{k: 1000 * d[k] / args.jobs for k in keys}})
        finally:
            srv.kill()
            srv.wait()
    print(f"   {'N':>2} {'jobs/s':>7} {'supervisor':>10} {'fork srv':>8} {'children':>8} {'redis':>6} "
          f"{'total ms/job':>12} {'cores busy':>10}")
    for slots in (1, 2):
        med = {k: statistics.median(x[k] for x in res[slots]) for k in ("rate",) + keys}
        total = sum(med[k] for k in keys)
        print(f"   {slots:>2} {med['rate']:>7.0f} {med['sup']:>10.2f} {med['fs']:>8.2f} {med['child']:>8.2f} "
              f"{med['redis']:>6.2f} {total:>12.2f} {total * med['rate'] / 1000:>10.2f}   rounds: "
              + " ".join(f"{x['rate']:.0f}" for x in res[slots]))
    ratios = [b["rate"] / a["rate"] for a, b in zip(res[1], res[2])]
    print(f"   N=2 / N=1 per round: {' '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f})")
    print(f"\n2. FORK FLOOR: fork + _exit + waitpid, {args.seconds:g} s loops, {args.rounds} rounds (medians)")
    print(f"   {'process imports':<16} {'forks/s':>7} {'parent ms':>9} {'child ms':>8} {'RSS MB':>6} {'maps':>5}")
    for what in ("nothing", "threading", "server", "server+redis"):
        runs = [fork_floor(what, args.seconds) for _ in range(args.rounds)]
        med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
        print(f"   {what:<16} {med['rate']:>7.0f} {med['parent']:>9.3f} {med['child']:>8.3f} {med['rss']:>6.0f} "
              f"{med['maps']:>5.0f}")
    return 0


def compare(rev: str, rounds: int, jobs: int) -> int:
    """Same-run comparison with ``rev``: what a change costs per job (issue 27: subreapers and the sweep)."""
    base = baseline_source(rev)
    print(f"machine: {os.cpu_count()} cpus; python {sys.version.split()[0]}; load {os.getloadavg()[0]:.2f}")
    print(f"DRAIN of {jobs} no-ops at N=1, {rounds} alternating rounds, net of an empty run: this tree vs {rev}")
    keys = ("sup", "fs", "child", "redis")
    res: dict = {"ours": [], rev: []}
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        srv = start_redis_server(port, tmp)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            for i in range(rounds):
                for name in (("ours", rev) if i % 2 == 0 else (rev, "ours")):
                    src = REPO if name == "ours" else base
                    e, f = drain(url, port, 0, 1, src), drain(url, port, jobs, 1, src)
                    d = {k: f[k] - e[k] for k in f}
                    res[name].append({"rate": jobs / d["wall"], **{k: 1000 * d[k] / jobs for k in keys}})
        finally:
            srv.kill()
            srv.wait()
    print(f"   {'tree':>8} {'jobs/s':>7} {'supervisor':>10} {'fork srv':>8} {'children':>8} {'redis':>6} "
          f"{'total ms/job':>12}")
    med = {}
    for name in ("ours", rev):
        med[name] = {k: statistics.median(x[k] for x in res[name]) for k in ("rate",) + keys}
        m = med[name]
        print(f"   {name:>8} {m['rate']:>7.0f} {m['sup']:>10.3f} {m['fs']:>8.3f} {m['child']:>8.3f} "
              f"{m['redis']:>6.3f} {sum(m[k] for k in keys):>12.3f}")
    rates = [a["rate"] / b["rate"] for a, b in zip(res["ours"], res[rev])]
    cpu = [sum(a[k] for k in keys) / sum(b[k] for k in keys) for a, b in zip(res["ours"], res[rev])]
    print(f"   ours / {rev} per round: jobs/s {' '.join(f'{x:.3f}' for x in rates)} (median "
          f"{statistics.median(rates):.3f}); CPU per job {' '.join(f'{x:.3f}' for x in cpu)} (median "
          f"{statistics.median(cpu):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
