"""What checkpoints cost (issue 13): µs per ``checkpoint()`` call in a tight loop inside a real job child, and the
drain rate of no-op jobs that never checkpoint against no-ops that checkpoint once, in the same run.

    make bench-checkpoint            # = .venv/bin/python bench/checkpoint.py [--calls 200000] [--jobs 2000] [--rounds 3]

A redis-server of its own on a free loopback port. Each drain is ``python -m worker --burst`` timed from start to
exit, alternating the two job kinds ``--rounds`` times (the machine is noisy: the median of each kind is reported).
Writes bench/results/checkpoint.{txt,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO)]

import redis  # noqa: E402

from tests.support import CONFIG_VARS, free_port, start_redis_server  # noqa: E402

RESULTS = BENCH / "results"


def worker_env(url: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    env.update(REDIS_URL=url, JOB_MODULES="worker.sample,bench.ckpt_jobs", LOG_LEVEL="WARNING",
               PYTHONPATH=str(REPO))
    return env


def drain(url: str, r: redis.Redis, name: str, jobs: int) -> float:
    from worker import enqueue_many, jobs as wjobs
    from worker import config as wconfig
    from worker.client import connect
    from worker.fetch import Broker
    cfg = wconfig.from_mapping({"REDIS_URL": url})
    wjobs.use(Broker(connect(cfg, name="bench"), cfg))
    r.flushall()
    enqueue_many(name, [[] for _ in range(jobs)], queue="default")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "worker", "--burst"], env=worker_env(url), cwd=str(REPO), check=True,
                   timeout=600)
    took = time.perf_counter() - t0
    assert r.get("worker:stat:processed") == str(jobs), r.get("worker:stat:processed")
    return jobs / took


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = start_redis_server(port, tmp)
        url = f"redis://127.0.0.1:{port}/0"
        r = redis.Redis.from_url(url, decode_responses=True)
        try:
            import worker.sample  # noqa: F401  (registers noop)
            import bench.ckpt_jobs  # noqa: F401
            from worker import enqueue
            from worker import jobs as wjobs
            from worker import config as wconfig
            from worker.client import connect
            from worker.fetch import Broker
            cfg = wconfig.from_mapping({"REDIS_URL": url})
            wjobs.use(Broker(connect(cfg, name="bench"), cfg))
            per_call = []
            for _ in range(a.rounds):
                r.flushall()
                enqueue("ck_loop", a.calls)
                subprocess.run([sys.executable, "-m", "worker", "--burst"], env=worker_env(url), cwd=str(REPO),
                               check=True, timeout=600)
                per_call.append(json.loads(r.lpop("ck:result"))["us_per_call"])
            rates = {"noop": [], "noop_ck": []}
            for _ in range(a.rounds):
                for name in rates:
                    rates[name].append(drain(url, r, name, a.jobs))
        finally:
            r.close()
            server.kill()
            server.wait(10)
    med = {k: statistics.median(v) for k, v in rates.items()}
    doc = {"machine": {"cores": os.cpu_count(), "python": platform.python_version()},
           "command": "make bench-checkpoint", "calls": a.calls, "jobs": a.jobs, "rounds": a.rounds,
           "checkpoint_us_per_call": {"median": statistics.median(per_call), "all": per_call},
           "noop_jobs_per_s": {k: {"median": med[k], "all": v} for k, v in rates.items()},
           "ratio_with_checkpoint": med["noop_ck"] / med["noop"]}
    lines = [f"checkpoint benchmark ({os.cpu_count()} cores, Python {platform.python_version()}; make bench-checkpoint)",
             f"checkpoint() in a tight loop, {a.calls} calls: {doc['checkpoint_us_per_call']['median']:.2f} µs per call "
             f"(median of {a.rounds}: {', '.join(f'{x:.2f}' for x in per_call)})",
             f"no-op jobs, {a.jobs} per drain, median of {a.rounds}: never checkpoint {med['noop']:.0f} jobs/s, "
             f"checkpoint once {med['noop_ck']:.0f} jobs/s (ratio {doc['ratio_with_checkpoint']:.2f})"]
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "checkpoint.txt").write_text("\n".join(lines) + "\n")
    (RESULTS / "checkpoint.json").write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
