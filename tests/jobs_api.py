"""Jobs and hooks for tests/test_job_api.py (JOB_MODULES=worker.sample,tests.jobs,tests.jobs_api). The hooks record
what they saw to the Redis list ``hooks``; one of them raises, to show a hook's error changes no outcome."""
import json
import logging
import time

from tests.jobs import r
from worker import job
from worker.hooks import after_job, before_job, on_failure

log = logging.getLogger("tests.jobs_api")


@job(result_ttl=60)
def api_add(a, b):
    return {"sum": a + b}


@job
def api_none():
    return None


@job(strict_result=True)
def api_set():
    """A return value that is not JSON, under strict_result: the job fails (before issue 24 item 8: every job)."""
    return {1, 2}


class Opaque:
    def __repr__(self):
        return "Opaque(" + "x" * 300 + ")"


@job
def api_odd(kind):
    """Returns a value that is not JSON (issue 24 item 8): done, with a marker for a result."""
    import datetime
    return {"set": {3}, "datetime": datetime.datetime(2026, 12, 6, 12, 0), "object": Opaque()}[kind]


@job(retries=1)
def api_fail(message):
    raise ValueError(message)


@job(result_ttl=0)
def api_forget():
    return "not kept"


@job
def api_log(text):
    log.info("job says %s", text)
    log.debug("a debug line")
    r().rpush("api_log", "done")


@job
def api_mul(a, b):
    """Its before_job hook raises (below)."""
    r().rpush("api_mul", a * b)
    return a * b


@job
def api_oops(message):
    """Raises; its on_failure hook raises too (below)."""
    raise ValueError(message)


@before_job
def _before(job):
    r().rpush("hooks", json.dumps({"hook": "before", "job": job.id, "name": job.name}))
    if job.name == "api_mul":
        raise RuntimeError("a broken before_job hook")


@on_failure
def _failure(job, exc):
    r().rpush("hooks", json.dumps({"hook": "failure", "job": job.id, "error": repr(exc)}))
    if job.name == "api_oops":
        raise RuntimeError("a broken on_failure hook")


@after_job
def _after(job, outcome):
    r().rpush("hooks", json.dumps({"hook": "after", "job": job.id, "status": outcome.status,
                                   "result": outcome.result}))
    if job.name == "api_add":
        raise RuntimeError("a broken hook")


def _ctx_event(key, **extra):
    from worker import current_job
    c = current_job()
    r().rpush(key, json.dumps({"id": c.id, "name": c.name, "queue": c.queue, "attempt": c.attempt,
                               "enqueued_at": c.enqueued_at, "stop_requested": c.stop_requested, **extra}))


@job(queue="ctxq", retries=1)
def api_ctx(key, fail_first=False, block=False):
    """Records current_job() on ``key``; fails its first attempt if ``fail_first``; with ``block``, waits for a
    stop and records current_job() again in its TermException handler before letting it propagate (put back)."""
    from worker import TermException, current_job
    _ctx_event(key)
    if fail_first and current_job().attempt == 1:
        raise IOError("first attempt fails")
    if block:
        try:
            time.sleep(30)
        except TermException:
            _ctx_event(key, term=True)
            raise
