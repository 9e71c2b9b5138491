"""Jobs for tests/test_groups.py (issue 25 item 4): members record their runs in Redis lists; the callback records
each of its runs (with the results it got) in ``<key>:report``. Names start with ``g_`` (job names are global)."""
import json
import time

from tests.jobs import r
from worker import job


@job(result_ttl=600)
def g_send(key, n):
    """A member that succeeds: returns ``n * 10``."""
    r().rpush(key + ":runs", str(n))
    return n * 10


@job(retries=1, result_ttl=600)
def g_fail(key, n):
    """A member that fails every attempt (one retry, then failed for good)."""
    r().rpush(key + ":runs", f"fail{n}")
    raise ValueError(f"member {n} fails")


@job(retries=2, result_ttl=600)
def g_flaky(key, n):
    """Fails its first attempt, succeeds on its retry."""
    tries = r().incr(f"{key}:flaky:{n}")
    r().rpush(key + ":runs", f"flaky{n}.{tries}")
    if tries == 1:
        raise RuntimeError("first attempt fails")
    return tries


@job(retries=3, dont_retry=(KeyError,), result_ttl=600)
def g_dont(key, n):
    """Fails at once (dont_retry), whatever its retries."""
    r().rpush(key + ":runs", f"dont{n}")
    raise KeyError(n)


@job(result_ttl=600)
def g_gate(key, n):
    """Announces its start (``<key>:started``), then waits for ``<key>:go`` (up to 60 s) before it returns n."""
    r().rpush(key + ":started", str(n))
    r().blpop([key + ":go"], 60)
    r().rpush(key + ":runs", str(n))
    return n


@job(result_ttl=600)
def g_short(key, n, seconds=0.01):
    """A short member for the chaos and size tests (``<key>:done`` set: every member that completed)."""
    time.sleep(seconds)
    r().sadd(key + ":done", n)
    return n


@job(result_ttl=600)
def g_report(key, label="", results=None):
    """The group's callback: records this run and what it got."""
    r().rpush(key + ":report", json.dumps({"label": label, "results": results}))
    return len(results)


@job(result_ttl=600)
def g_count(key, results=None):
    """A callback for big groups: records only its run and a summary."""
    r().rpush(key + ":report", json.dumps({"n": len(results), "done": sum(x["status"] == "done" for x in results),
                                           "ids": [x["id"] for x in results[:3]]}))
    return len(results)


@job(result_ttl=600)
def g_chaos_report(key, gid, results=None):
    """The chaos test's callback: one entry per run in ``<key>:report:<gid>``."""
    from worker import current_job
    r().rpush(f"{key}:report:{gid}", json.dumps({"attempt": current_job().attempt, "n": len(results),
                                                 "done": sum(x["status"] == "done" for x in results)}))
