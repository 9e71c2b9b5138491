"""Jobs for bench/checkpoint.py (JOB_MODULES=worker.sample,bench.ckpt_jobs)."""
import json
import os
import time

import redis

from worker import checkpoint, job


@job
def ck_loop(n):
    """Call checkpoint() ``n`` times in a tight loop; report the time per call (µs) to the list ``ck:result``."""
    t0 = time.perf_counter()
    for i in range(n):
        checkpoint(i)
    per_call = (time.perf_counter() - t0) / n * 1e6
    redis.Redis.from_url(os.environ["REDIS_URL"]).rpush("ck:result", json.dumps({"n": n, "us_per_call": per_call}))


@job
def noop_ck():
    """A no-op that records one checkpoint (the feature used once per job)."""
    checkpoint(1)
