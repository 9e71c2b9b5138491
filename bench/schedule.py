"""What periodic jobs cost the worker (issue 14).

    make bench-schedule                       # = .venv/bin/python bench/schedule.py
    .venv/bin/python bench/schedule.py --calls 2000 --jobs 2000 --repeat 3

On a redis-server of its own (loopback, free port):

* per call: N calls of the per-turn CYCLE script as an idle worker makes it (heartbeat, due scheduled jobs, one
  claim attempt on an empty queue) next to N calls of the SCHEDULE script through ``schedule.Ticker.run`` (the
  Python side included: tick computation and payload building) with 1 and 10 schedules (every= and cron=). A worker
  makes one SCHEDULE call when a tick is due (at most a few a second), never per job; without schedules it makes
  none and its loop pays one ``if self.ticker`` test per turn.
* throughput: a (non-burst) worker drains ``--jobs`` noop jobs with JOB_MODULES=worker.sample and with
  tests.jobs_schedule added (four schedules, one of them every second), alternately, ``--repeat`` times each;
  jobs/s is counted from the first job done to the last (P:stat:processed), so start-up is left out.
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

import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.support import CONFIG_VARS, free_port, start_redis_server  # noqa: E402
from worker import config, jobs, schedule  # noqa: E402
from worker.fetch import Broker  # noqa: E402


class Quiet:
    def info(self, *a, **k):
        pass
    error = warning = debug = info


def per_call(url: str, calls: int) -> dict:
    cfg = config.from_mapping({"REDIS_URL": url})
    r = redis.Redis.from_url(url, decode_responses=True)
    broker = Broker(r, cfg)
    out = {}

    def timed(fn):
        fn()
        best = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            best.append((time.perf_counter() - t0) / calls * 1e6)
        return min(best)
    out["CYCLE (idle turn: beat + claim attempt)"] = timed(lambda: broker.cycle("bench:1", (), [0], 0, ""))
    for n in (1, 10):
        scheds = [schedule.build(f"s{i}", "sched", schedule.declare(60 if i % 2 else None,
                                                                    None if i % 2 else "*/5 * * * *",
                                                                    None, None, [i], {}))
                  for i in range(n)]
        ticker = schedule.Ticker(scheds, broker, Quiet())
        out[f"SCHEDULE, {n} schedule{'s' if n > 1 else ''} (Ticker.run)"] = timed(ticker.run)
    r.close()
    return out


def drain(url: str, n: int, modules: str, workdir: str) -> float:
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushall()
    cfg = config.from_mapping({"REDIS_URL": url})
    jobs.use(Broker(r, cfg))
    jobs.import_modules(["worker.sample"])
    jobs.enqueue_many("noop", [[] for _ in range(n)])
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    env.update(REDIS_URL=url, JOB_MODULES=modules, LOG_LEVEL="WARNING", PYTHONPATH=str(REPO))
    with open(os.path.join(workdir, "worker.log"), "a") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "worker"], env=env, cwd=str(REPO), stdout=logf,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while int(r.get("worker:stat:processed") or 0) < 1:
            assert time.monotonic() < deadline and proc.poll() is None, "the worker did not start"
            time.sleep(0.001)
        t0, done0 = time.perf_counter(), int(r.get("worker:stat:processed"))
        while int(r.get("worker:stat:processed") or 0) < n:
            assert time.monotonic() < deadline and proc.poll() is None, "the worker did not finish"
            time.sleep(0.005)
        return (n - done0) / (time.perf_counter() - t0)
    finally:
        proc.terminate()
        proc.wait(15)
        r.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        port = free_port()
        server = start_redis_server(port, workdir)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            print(f"per call, best of 3 x {args.calls} calls (us):")
            for name, us in per_call(url, args.calls).items():
                print(f"  {name:45s} {us:8.1f}")
            rates = {"without schedules": [], "with 4 schedules": []}
            for _ in range(args.repeat):
                rates["without schedules"].append(drain(url, args.jobs, "worker.sample", workdir))
                rates["with 4 schedules"].append(drain(url, args.jobs, "worker.sample,tests.jobs_schedule", workdir))
            print(f"throughput, {args.jobs} noop jobs, median of {args.repeat} (jobs/s):")
            for name, xs in rates.items():
                print(f"  {name:45s} {statistics.median(xs):8.0f}   ({', '.join(f'{x:.0f}' for x in xs)})")
        finally:
            server.kill()
            server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
