"""Periodic jobs unique per schedule (issue 25 item 1; tests/test_schedule.py). Each records its runs (start and end
times, pid) in Redis lists and holds until the test pushes ``<name>:go`` (or ``hold`` seconds pass), so a run lasts
as long as the test needs: a slow job whose ticks would pile up without the skip."""
import json
import os
import time

from tests.jobs import r
from worker import job


def _run(name, hold):
    r().rpush(name + ":runs", json.dumps({"pid": os.getpid(), "start": time.time()}))
    r().blpop([name + ":go"], hold)
    r().rpush(name + ":ends", json.dumps({"pid": os.getpid(), "end": time.time()}))


@job(every=1, queue="slow", result_ttl=60)
def slow_tick():
    """Unique per schedule (the default): its ticks are skipped while a run has not ended."""
    _run("slow_tick", 30)


@job(every=1, queue="overlap", unique=False)
def overlapping_tick():
    """Opted out: every tick is enqueued, so runs of a slow job overlap."""
    _run("overlapping_tick", 2.5)
