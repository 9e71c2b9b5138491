"""Jobs for tests/test_wait.py, test_cancel.py and the per-call options tests (issue 24 items 1-4): each reports to
a Redis list and, where a test must act while it runs, waits for a release the test pushes."""
from tests.jobs import r
from worker import TermException, job


@job(result_ttl=60)
def gate(key, value=None):
    """Reports it started (``<key>:started``), waits for ``<key>:go``, returns what was pushed there (or value)."""
    r().rpush(key + ":started", "1")
    got = r().blpop([key + ":go"], 30)
    return value if value is not None else (got[1] if got else None)


@job
def gate_fail(key):
    r().rpush(key + ":started", "1")
    r().blpop([key + ":go"], 30)
    raise ValueError("gate_fail says no")


@job(result_ttl=0)
def forget(value):
    return value


@job
def quick(key, value=None):
    r().rpush(key, value if value is not None else "ran")
    return value


@job
def until_stopped(key):
    """Runs until stopped; reports a TermException to ``<key>:term``."""
    r().rpush(key + ":started", "1")
    try:
        r().blpop([key + ":never"], 60)
    except TermException:
        r().rpush(key + ":term", "1")
        raise


@job(retries=3)
def fail_often(key):
    r().rpush(key, "ran")
    raise ValueError("again")
