"""What concurrency and rate limits cost (issue 25 items 2 and 3).

    .venv/bin/python bench/limits.py [--rounds 21] [--batch 500] [--wait 10]

A redis-server of its own on a free loopback port. Two parts:

1. **Redis µs per claim** (``INFO commandstats`` EVALSHA usec / calls, the commands inside the script included), one
   loop playing a single-slot worker as bench/cycle_cost.py does (record job k's outcome and claim job k+1 in one
   CYCLE call, tidying every 100 ms), over four runs that take turns of ``--batch`` calls on one server:
   ``no limits`` (the worker serves no limited job: ``nlim = 0``), ``limits, other job`` (the worker serves a
   limited job but runs another: what an unlimited job pays beside limited ones), ``concurrency`` (every job
   ``@job(concurrency=1000)``: never held, the count kept) and ``rate`` (every job ``@job(rate="1000000/s")``:
   never held, the bucket kept), and ``no limits, again`` (A/A: how far two identical runs differ on this machine).
   Each run has a key prefix of its own. Ratios are against ``no limits``.
2. **No spin while limited jobs wait**: a real worker (``WORKER_CONCURRENCY=4``) with ``hold``
   (bench/limits_jobs.py, ``concurrency=1``) running one job that sleeps, and 1,000 more of it queued: once all 1,000 are held, the worker
   tree's CPU (worker, fork server, spare child: /proc utime+stime) and Redis's commands over ``--wait`` seconds,
   against the same worker idle with empty queues; then the same with 1,000 jobs of ``trickle`` (``rate="2/m"``)
   parked in the schedule until their tokens.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO)]

from bench import scratch_redis, use_module_broker  # noqa: E402
from tests.support import CONFIG_VARS, descendants  # noqa: E402

RUNS = {  # name -> (limits section of CYCLE, job name run)
    "no limits": ([0], "noop"),
    "no limits, again": ([0], "noop"),  # the same as the first: the noise floor between runs (A/A)
    "limits, other job": ([1, "other", 1000, "", ""], "noop"),
    "concurrency": ([1, "noop", 1000, "", ""], "noop"),
    "rate": ([1, "noop", "", 1000000, 1000], "noop"),
}


def evalsha(r) -> tuple:
    s = r.info("commandstats").get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    return int(s["calls"]), int(s["usec"])


def claim_cost(url: str, r, rounds: int, batch: int) -> None:
    import dataclasses
    import json

    from worker import config
    from worker.fetch import Broker, Outcome
    loops = {}
    for i, (label, (limits, name)) in enumerate(RUNS.items()):
        b = Broker(r, config.from_mapping({"REDIS_URL": url, "KEY_PREFIX": f"lb{i}"}))
        b.limits = limits
        r.set(b.keys.epoch, "bench")
        b.epoch = "bench"
        for _ in range(rounds * batch // 1000 + 2):
            b.push_many(name, [((), {})] * 1000, queue="default")
        c = b.cycle("w:1", [], [0], 0, "")
        loops[label] = [b, c.claims[0], time.monotonic(), []]
    for n in range(rounds):
        order = list(loops) if n % 2 == 0 else list(reversed(loops))
        for label in order:
            loop = loops[label]
            b, prev, next_tidy, got = loop
            calls0, usec0 = evalsha(r)
            for _ in range(batch):
                now = time.monotonic()
                tidy = now >= next_tidy
                next_tidy = now + 0.1 if tidy else next_tidy
                ack = dataclasses.replace(Outcome.ack(prev.payload, 0, json.loads(prev.payload)["id"]),
                                          started_ms=prev.at)
                c = b.cycle("w:1", [ack], [0], 0, "", beat=False, tidy=tidy)
                prev = c.claims[0]
            calls1, usec1 = evalsha(r)
            loop[1], loop[2] = prev, next_tidy
            if n:  # the first round warms up
                got.append((usec1 - usec0) / (calls1 - calls0))
    base = statistics.median(loops["no limits"][3])
    print(f"Redis µs per CYCLE call (record one job, claim the next), {rounds - 1} turns of {batch} per run, "
          f"alternating, one redis-server:")
    for label, loop in loops.items():
        med = statistics.median(loop[3])
        print(f"  {label:20s} per-turn median {med:6.1f} µs   mean {statistics.mean(loop[3]):6.1f}   "
              f"÷ no limits {med / base:.3f}x")


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in [pid] + descendants(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def window(r, pid: int, seconds: float) -> tuple:
    cpu0, cmds0 = tree_cpu(pid), int(r.info("stats")["total_commands_processed"])
    time.sleep(seconds)
    return tree_cpu(pid) - cpu0, int(r.info("stats")["total_commands_processed"]) - cmds0


def no_spin(url: str, r, seconds: float) -> None:
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    env.update(REDIS_URL=url, JOB_MODULES="bench.limits_jobs", QUEUES="default", LOG_LEVEL="WARNING",
               PYTHONPATH=str(REPO), WORKER_CONCURRENCY="4")
    w = subprocess.Popen([sys.executable, "-m", "worker"], env=env, cwd=str(REPO))
    try:
        import bench.limits_jobs  # noqa: F401
        from worker import jobs
        from worker.keys import Keys
        k = Keys()
        use_module_broker(url)
        while not r.zcard(k.workers):  # registered
            time.sleep(0.1)
        time.sleep(1.5)
        idle_cpu, idle_cmds = window(r, w.pid, seconds)
        jobs.enqueue("hold", 3600)
        while not r.hlen(k.running("hold")):
            time.sleep(0.05)
        t0 = time.monotonic()
        jobs.enqueue_many("hold", [(0,)] * 1000)
        while r.llen(k.held("hold")) < 1000:
            time.sleep(0.05)
        held_after = time.monotonic() - t0
        time.sleep(1.0)
        lim_cpu, lim_cmds = window(r, w.pid, seconds)
        print(f"worker tree (WORKER_CONCURRENCY=4) over {seconds:g} s:")
        print(f"  idle, empty queues                                 CPU {idle_cpu:6.3f} s "
              f"({100 * idle_cpu / seconds:5.2f} %)   Redis commands {idle_cmds}")
        print(f"  1 hold running + 1,000 held (concurrency=1)        CPU {lim_cpu:6.3f} s "
              f"({100 * lim_cpu / seconds:5.2f} %)   Redis commands {lim_cmds}")
        print(f"  (all 1,000 held {held_after:.2f} s after enqueue_many; queue left: {r.llen(k.queue('default'))})")
        t0 = time.monotonic()
        jobs.enqueue_many("trickle", [()] * 1000)
        while r.zcard(k.scheduled) < 998:  # 2 run at once (the bucket), the rest wait for their tokens
            time.sleep(0.05)
        parked_after = time.monotonic() - t0
        time.sleep(1.0)
        rate_cpu, rate_cmds = window(r, w.pid, seconds)
        print(f"  + 998 trickle parked (rate=2/m) beside them         CPU {rate_cpu:6.3f} s "
              f"({100 * rate_cpu / seconds:5.2f} %)   Redis commands {rate_cmds}")
        print(f"  (998 parked {parked_after:.2f} s after enqueue_many; at most one token falls due in the window)")
    finally:
        w.terminate()
        w.wait(15)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=21, help="turns per run (the first is a warm-up)")
    ap.add_argument("--batch", type=int, default=500, help="CYCLE calls per turn")
    ap.add_argument("--wait", type=float, default=10.0, help="seconds of the CPU windows")
    a = ap.parse_args()
    with scratch_redis() as (url, r):
        claim_cost(url, r, a.rounds, a.batch)
        r.flushall()
        no_spin(url, r, a.wait)
    return 0


if __name__ == "__main__":
    sys.exit(main())
