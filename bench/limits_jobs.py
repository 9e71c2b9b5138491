"""Jobs for bench/limits.py: a concurrency-limited job that holds its slot by sleeping."""
import time

from worker import job


@job(concurrency=1, result_ttl=0)
def hold(seconds):
    time.sleep(seconds)
