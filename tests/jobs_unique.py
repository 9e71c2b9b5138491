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
    return _fail_once(key)


def _fail_once(key):
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


@job(unique=True, unique_until="start", result_ttl=60)
def ustart(key, user_id=0, note=""):
    """unique_until="start": the key is free once a run starts."""
    return _run(key, note)


@job(unique=True, unique_until="start", retries=1, result_ttl=60)
def ustart_fail_once(key):
    """unique_until="start"; fails its first attempt (a retry follows)."""
    return _fail_once(key)


@job(unique=True, unique_until="start")
def uquick_start(a, b=2):
    """For inline mode (no Redis)."""
    return a + b


def _alive(pid):
    """A process that runs (a zombie has ended: it only waits to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@job(unique=True, result_ttl=600)
def uchaos(key, seconds=0.1):
    """The chaos test's unique job: before it starts its work, any earlier run of the same key that has not ended
    and whose process still runs is an overlap (recorded in ``uc:overlaps``); its own run is open (``uc:<key>:open``)
    until it ends, normally or by a stop's TermException. A SIGKILLed run stays open with a dead pid."""
    _chaos_run(key, seconds, check=True)


@job(unique=True, unique_until="start", result_ttl=600)
def uchaos_start(key, seconds=0.1):
    """The same with unique_until="start": runs of a key may overlap by design (not checked)."""
    _chaos_run(key, seconds, check=False)


def _chaos_run(key, seconds, check):
    from worker import current_job
    rr, me = r(), str(os.getpid())
    for pid in rr.smembers(f"uc:{key}:open") if check else ():
        if pid != me and _alive(int(pid)):
            rr.rpush("uc:overlaps", f"{key} pid {pid} still runs as {me} starts")
    rr.sadd(f"uc:{key}:open", me)
    rr.rpush("uc:runs", json.dumps({"key": key, "id": current_job().id, "pid": os.getpid(), "start": time.time()}))
    try:
        time.sleep(seconds)
    finally:
        rr.srem(f"uc:{key}:open", me)
    rr.rpush("uc:ends", json.dumps({"key": key, "end": time.time()}))
