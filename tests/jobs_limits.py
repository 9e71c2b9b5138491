"""Jobs for tests/test_limits.py (issue 25 items 2 and 3): each records its run's start and end (time, pid, tag) as
events on a Redis list (tests/jobs.py ``event``), so a test can measure how many ran at once and when."""
import time

from tests.jobs import event, r
from worker import job


@job(concurrency=2, result_ttl=60)
def lim2(key, tag, hold=0.3):
    """At most two at once, everywhere; runs ``hold`` seconds."""
    event(key, "start", tag=tag)
    time.sleep(hold)
    event(key, "end", tag=tag)


@job(concurrency=1, result_ttl=60)
def lim1(key, tag):
    """One at a time; waits (up to 60 s) for a release the test pushes to ``<key>:go``."""
    event(key, "start", tag=tag)
    r().blpop([key + ":go"], 60)
    event(key, "end", tag=tag)


@job(rate="5/s", result_ttl=60)
def rated(key, tag):
    """At most 5 per second (a bucket of 5), every worker together."""
    event(key, "start", tag=tag)


@job(rate="2/s", concurrency=1, result_ttl=60)
def both(key, tag, hold=0.1):
    """Both limits at once."""
    event(key, "start", tag=tag)
    time.sleep(hold)
    event(key, "end", tag=tag)


@job(result_ttl=60)
def free(key, tag):
    """No limit, same queue as the limited ones."""
    event(key, "start", tag=tag)
    event(key, "end", tag=tag)


@job(concurrency=1, retries=1, result_ttl=60)
def lim1_flaky(key, tag):
    """One at a time; its first attempt fails (a retry follows), the second waits for ``<key>:go``."""
    n = r().incr(f"{key}:{tag}:n")
    event(key, "start", tag=tag)
    if n == 1:
        event(key, "end", tag=tag)
        raise ValueError("first attempt fails")
    r().blpop([key + ":go"], 60)
    event(key, "end", tag=tag)
