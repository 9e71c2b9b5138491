"""Jobs for tests/test_unique.py (issue 25 item 1): each records its runs (pid, start and end times) in Redis lists
and, where a test must act while it runs, waits for a release the test pushes to ``<key>:go``."""
import json
import os
import time

from tests.jobs import r
from worker import job


def _run(key, note):
    r().rpush(key + ":runs", json.dumps({"pid": os.getpid(), "start": time.time(), "note": note}))
    r().rpush(key + ":started", note)
    got = r().blpop([key + ":go"], 30)
    r().rpush(key + ":ends", json.dumps({"pid": os.getpid(), "end": time.time()}))
    return got[1] if got else None


@job(unique=True, result_ttl=60)
def ugate(key, user_id=0, note=""):
    """Unique on every argument; records its run and waits for ``<key>:go``."""
    return _run(key, note)


@job(unique=("user_id",), result_ttl=60)
def uby_user(key, user_id, note=""):
    """Unique on ``user_id`` only."""
    return _run(key, note)


@job(unique=True, retries=1, result_ttl=60)
def ufail_once(key):
    """Fails its first attempt (a retry follows), succeeds on the second once released."""
    n = r().incr(key + ":n")
    r().rpush(key + ":started", str(n))
    r().blpop([key + ":go"], 30)
    if n == 1:
        raise ValueError("first attempt fails")
    return n


@job(unique=True, retries=0)
def ufail(key):
    r().rpush(key + ":started", "1")
    raise ValueError("always")


@job(unique=True)
def uquick(a, b=2):
    """For inline mode (no Redis)."""
    return a + b
