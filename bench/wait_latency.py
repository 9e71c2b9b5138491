"""Job.wait's added latency (issue 24 item 1): from a job's outcome being recorded (its ``ended_at``, Redis's
clock, the same host's clock here) to ``wait()`` returning in the producer, over ``--jobs`` jobs run one at a time
by a real worker while a waiter is already blocked on each.

    .venv/bin/python bench/wait_latency.py [--jobs 60]

A redis-server of its own on a free loopback port; prints min / median / p95 / max in ms (target: median < 50 ms).
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
from tests.support import CONFIG_VARS  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=60)
    a = ap.parse_args()
    with scratch_redis() as (url, r):
        env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
        env.update(REDIS_URL=url, JOB_MODULES="worker.sample,tests.jobs,tests.jobs_control", LOG_LEVEL="WARNING",
                   PYTHONPATH=str(REPO))
        w = subprocess.Popen([sys.executable, "-m", "worker"], env=env, cwd=str(REPO))
        try:
            import tests.jobs_control  # noqa: F401
            from worker import jobs as wjobs
            from worker.results import get_job
            use_module_broker(url)
            lat = []
            for i in range(a.jobs):
                job_id = wjobs.enqueue("gate", f"b{i}", "x")
                assert r.blpop([f"b{i}:started"], 30)
                j = get_job(job_id)
                # release the job from another connection 50 ms after the wait has begun
                subprocess.Popen([sys.executable, "-c", "import sys, time, redis; time.sleep(0.05); "
                                  "redis.Redis.from_url(sys.argv[1]).rpush(sys.argv[2], '1')", url, f"b{i}:go"])
                done = j.wait(timeout=30)
                back = time.time()
                assert done.status == "done", done
                lat.append((back - done.ended_at) * 1000)
            lat.sort()
            p95 = lat[max(0, int(len(lat) * 0.95) - 1)]
            print(f"wait latency over {len(lat)} jobs (outcome recorded -> wait() returned): min {lat[0]:.2f} ms, "
                  f"median {statistics.median(lat):.2f} ms, p95 {p95:.2f} ms, max {lat[-1]:.2f} ms")
        finally:
            w.terminate()
            w.wait(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
