"""Jobs for bench/limits.py: a concurrency-limited job that holds its slot by sleeping."""
import time

from worker import job


@job(concurrency=1, result_ttl=0)
def hold(seconds):
    time.sleep(seconds)


@job(rate="2/m", result_ttl=0)
def trickle():
    """A bucket of 2, then one every 30 s: 1,000 of them are parked in the schedule, each until its token."""
