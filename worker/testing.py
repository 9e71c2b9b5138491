"""Test helpers for apps that use the worker: run jobs inline in unit tests, or a real burst worker in integration
tests.

**Inline mode** (unit tests, no Redis, no fork)::

    from worker import testing

    def test_signup_sends_welcome():
        with testing.inline() as jobs_run:
            signup(...)                          # app code that calls send_welcome.enqueue(user.pk)
        (j,) = jobs_run.jobs                     # every job enqueued inside the block, in order
        assert j["name"] == "send_welcome" and j["status"] == "done"

Under ``inline()`` every ``enqueue``/``enqueue_in``/``enqueue_at``/``enqueue_many`` (and ``f.enqueue``) runs the
job at once, in the calling process and thread, and returns its id; no connection to Redis is ever made. What stays
as in production: the name must be registered (the job module imported), the arguments go through the same JSON
encoding (a ``datetime`` argument fails at enqueue with the same ``TypeError``; a tuple arrives as a list), the
arguments must fit the function, and a return value that is not JSON is kept as the same marker (or fails the job with
``@job(strict_result=True)``). What differs: no retries (one
attempt), no timeout, no fork (a job's global side effects stay in the test process).

* **Exceptions** of the job propagate out of the enqueue call (like RQ's ``is_async=False``), after the outcome is
  recorded; ``inline(raise_errors=False)`` only records them (like Celery's eager mode with
  ``task_eager_propagates`` off): ``status`` ``failed`` and ``error`` ``{type, message, traceback}``.
* **Scheduled jobs** (``enqueue_in``/``enqueue_at``) run at once by default. ``inline(run_scheduled=False)``
  records them as ``scheduled`` instead; ``.run_scheduled()`` on the context object runs them (in enqueue order).
* ``worker.get_job(id)`` answers from the inline records while the block is active (see :func:`lookup`);
  ``checkpoint()`` is a no-op and ``last_checkpoint(default)`` returns ``default``.

**Burst worker** (integration tests against a real Redis): :func:`run_burst` runs ``python -m worker --burst``
as a subprocess, which works every queue until it is empty, then exits; it returns the exit code and output.

Interface for ``worker.get_job``: :func:`active` tells whether inline mode is on; :func:`lookup` returns a dict
with the fields of a job record (``id, name, queue, status, result, error, attempts, enqueued_at, started_at,
ended_at``) or ``None`` for an id not enqueued in the current inline block.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Sequence

from . import aio, context, jobs
from .payload import is_unique, unique_id, unique_lock, unserializable

#: Stack of active inline contexts (innermost last); module state, like the enqueue API's default broker.
_stack: list = []

#: Largest payload accepted in inline mode (the MAX_PAYLOAD_BYTES default; the environment is not read).
_MAX_PAYLOAD = 512 * 1024


def active() -> bool:
    """True inside :func:`inline`."""
    return bool(_stack)


def lookup(job_id: str) -> Optional[dict]:
    """The record of a job enqueued in the active inline block (innermost first, then enclosing ones), as a dict
    with the fields of ``worker.get_job``'s result; ``None`` when inline mode is off or the id is unknown.
    The dict is a copy: changing it changes nothing."""
    for ctx in reversed(_stack):
        rec = ctx._by_id.get(job_id)
        if rec is not None:
            return dict(rec)
    return None


def cancel(job_id: str) -> bool:
    """``worker.cancel`` in inline mode: only a scheduled job held back (``run_scheduled=False``) can be."""
    return any(ctx.cancel(job_id) for ctx in reversed(_stack))


class InlineJobs:
    """What :func:`inline` yields: the jobs enqueued in the block, and the broker the enqueue API uses meanwhile.

    ``jobs`` lists every record (dicts, see :func:`lookup`) in enqueue order; ``get(id)`` returns one."""

    inline = True  # worker.metrics: nothing waits in a queue in inline mode

    def __init__(self, raise_errors: bool, run_scheduled: bool):
        self.raise_errors = raise_errors
        self.run_at_once = run_scheduled
        self._by_id: dict = {}
        self._held: list = []
        self._groups: dict = {}  # group id -> its member ids and callback id (push_group)

    @property
    def jobs(self) -> list:
        return [dict(rec) for rec in self._by_id.values()]

    def get(self, job_id: str) -> Optional[dict]:
        rec = self._by_id.get(job_id)
        return dict(rec) if rec is not None else None

    def run_scheduled(self) -> list:
        """Run the jobs held as ``scheduled`` (``run_scheduled=False``), in enqueue order; returns their ids."""
        held, self._held = self._held, []
        for job_id, doc in held:
            self._run(doc)
        return [job_id for job_id, _ in held]

    def cancel(self, job_id: str) -> bool:
        held = [h for h in self._held if h[0] == job_id]
        if not held:
            return False
        self._held.remove(held[0])
        self._by_id[job_id].update(status="canceled", ended_at=round(time.time(), 6))
        return True

    # --- the broker interface of worker.jobs (push / push_many) ---
    def push(self, name, args, kwargs, queue=None, due=None, delay=None, job_id=None, options=None,
             **_ignored) -> str:
        later = (delay is not None and float(delay) > 0) or (due is not None and float(due) > time.time())
        at = None if not later else (time.time() + float(delay) if delay is not None else float(due))
        lock = None
        if job_id is None:
            job_id = unique_id(name, args, kwargs)  # @job(unique=)
            lock = unique_lock(job_id) if job_id is not None else None
        if lock is not None:  # unique_until="start": a job of the key that waits to start holds it
            for other, rec in self._by_id.items():
                if unique_lock(other) == lock and rec["status"] in ("queued", "scheduled"):
                    return other
        held = self._by_id.get(job_id) if job_id is not None else None
        if held is not None and held["status"] in ("queued", "scheduled", "running"):
            return job_id  # an own id whose job has not ended: nothing enqueued (as enqueue.lua)
        doc = self._record(name, args, kwargs, queue, at, job_id, options)
        if later and not self.run_at_once:
            self._by_id[doc["id"]]["status"] = "scheduled"
            self._held.append((doc["id"], doc))
        else:
            self._run(doc)
        return doc["id"]

    def push_many(self, name, calls, queue=None, **_ignored) -> list:
        if is_unique(name):  # one call at a time, each deduplicated (as Broker.push_many)
            return [self.push(name, *(c if isinstance(c, tuple) and len(c) == 2 and isinstance(c[1], dict)
                                      else (c, {})), queue=queue) for c in calls]
        docs = []
        for call in calls:  # every payload is built (and checked) before any job runs, as in a real bulk enqueue
            if isinstance(call, tuple) and len(call) == 2 and isinstance(call[1], dict):
                args, kwargs = call
            else:
                args, kwargs = call, {}
            docs.append(self._record(name, args, kwargs, queue, None))
        for doc in docs:
            self._run(doc)
        return [d["id"] for d in docs]

    def push_group(self, members, on_complete) -> str:
        """``worker.group(...).enqueue()`` inline: every member runs now, in order (a member's exception is recorded,
        never raised, so the group goes on); then the callback, with ``results=``, as any inline job."""
        gid = uuid.uuid4().hex
        docs = [self._record(m.name, m.args, m.kwargs, m.queue, None, options=m.options) for m in members]
        cb = self._record(on_complete.name, on_complete.args, on_complete.kwargs, on_complete.queue, None,
                          options=on_complete.options)
        self._groups[gid] = {"members": [d["id"] for d in docs], "callback": cb["id"]}
        raise_errors, self.raise_errors = self.raise_errors, False
        try:
            for doc in docs:
                self._run(doc)
        finally:
            self.raise_errors = raise_errors
        cb["kwargs"]["results"] = [{k: self._by_id[d["id"]][k] for k in ("id", "status", "result")}
                                   | {"error": _short(self._by_id[d["id"]]["error"])} for d in docs]
        self._run(cb)
        return gid

    def group_of(self, gid: str) -> Optional[dict]:
        """``worker.get_group`` inline."""
        g = self._groups.get(gid)
        if g is None:
            return None
        recs = [self._by_id[i] for i in g["members"]]
        n = {s: sum(r["status"] == s for r in recs) for s in ("done", "failed", "canceled")}
        cb = self._by_id[g["callback"]]
        return {"id": gid, "total": len(recs), **n, "pending": len(recs) - sum(n.values()), "created_at": None,
                "completed_at": cb["started_at"], "callback": {"id": cb["id"], "name": cb["name"],
                                                              "status": cb["status"], "stuck": None}}

    # --- internals ---
    def _record(self, name, args, kwargs, queue, at, job_id=None, options=None) -> dict:
        if jobs.registered(name) is None:
            raise ValueError(f"job {name!r} is not registered in this process: inline mode runs jobs in the test "
                             f"process, so import the module that defines it (e.g. `import myapp.jobs`)")
        job_id, q, payload = jobs.build_payload(name, args, kwargs, queue, _MAX_PAYLOAD, at=at, job_id=job_id,
                                                options=options)
        doc = json.loads(payload)  # the job sees what a worker would: the arguments after a JSON round trip
        self._by_id[job_id] = {"id": job_id, "name": name, "queue": q, "status": "queued", "result": None,
                               "error": None, "attempts": 0, "enqueued_at": doc["enqueued_at"], "started_at": None,
                               "ended_at": None}
        return doc

    def _run(self, doc) -> None:
        rec = self._by_id[doc["id"]]
        spec = jobs.registered(doc["name"])
        rec.update(status="running", attempts=rec["attempts"] + 1, started_at=round(time.time(), 6))
        prev = context.enter(doc, spec.name)
        try:
            try:
                spec.signature.bind(*doc["args"], **doc["kwargs"])
            except TypeError as exc:
                raise jobs.BadJob(f"arguments do not fit {spec.name}{spec.signature}: {exc}") from None
            if spec.is_async:
                value = aio.run_inline(spec.fn, doc["args"], doc["kwargs"])
            else:
                value = spec.fn(*doc["args"], **doc["kwargs"])
            result, warning = _kept(spec, value)
        except Exception as exc:
            error = {"type": type(exc).__name__, "message": str(exc)[:2000],
                     "traceback": traceback.format_exc()[-20000:]}
            if not spec.retryable(exc):  # dont_retry/retry_on: a worker would fail it at once, whatever retries
                error["retryable"] = False
            rec.update(status="failed", ended_at=round(time.time(), 6), error=error)
            if self.raise_errors:
                raise
            return
        finally:
            context.leave(prev)
        rec.update(status="done", result=result, ended_at=round(time.time(), 6))
        if warning is not None:  # only then, so a record keeps the shape get_job's has
            rec["warning"] = warning


def _short(error) -> Optional[dict]:
    """A failed member's ``error`` as a group's ``results=`` carry it: ``{type, message}``."""
    return None if error is None else {"type": error.get("type"), "message": error.get("message")}


def _kept(spec, value) -> tuple:
    """``(result, warning)`` as a worker keeps a job's return value: after a JSON round trip; not JSON: a marker and
    a warning (``payload.unserializable``), or with ``@job(strict_result=True)`` a ``TypeError`` (the job fails)."""
    try:
        return json.loads(jobs.json_dumps(value)), None
    except (TypeError, ValueError, RecursionError) as exc:
        if spec.strict_result:
            raise TypeError(f"job {spec.name!r} returned a value that is not JSON ({exc}); return JSON "
                            f"(dict, list, str, number, bool, None) or nothing") from None
        marker, warning = unserializable(value, exc)
        logging.getLogger("worker.testing").warning("job.result_unserializable name=%s %s", spec.name, warning)
        return marker, warning


@contextmanager
def inline(*, raise_errors: bool = True, run_scheduled: bool = True) -> Iterator[InlineJobs]:
    """Run every job enqueued inside the block synchronously, in this process, without Redis (see the module
    docstring). Nests; the enqueue API's previous broker is restored on exit."""
    from . import child
    ctx = InlineJobs(raise_errors, run_scheduled)
    previous = jobs.current_broker()
    _stack.append(ctx)
    jobs.use(ctx)
    child.set_inline(True)
    try:
        yield ctx
    finally:
        _stack.remove(ctx)
        jobs.use(_stack[-1] if _stack else previous)
        child.set_inline(bool(_stack))


# --- integration tests: a real worker in burst mode ---

@dataclass
class BurstResult:
    """How a :func:`run_burst` worker ended: its exit code (0 = every queue drained) and its log (stdout+stderr)."""

    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


#: never `python -m worker`, which runs an app's own ./worker.py instead (worker/launch.py)
_LAUNCH = "import sys; from worker.launch import console; sys.exit(console(sys.argv[1:]))"


def run_burst(redis_url: str, *, queues: Optional[Sequence[str]] = None, job_modules: Optional[Sequence[str]] = None,
              env: Optional[Mapping[str, str]] = None, timeout: float = 60.0, cwd: Optional[str] = None,
              python: Optional[str] = None) -> BurstResult:
    """Run a ``--burst`` worker (``heroku-fork-worker --burst``) against ``redis_url`` until every queue it works is
    empty. It is never ``python -m worker``: beside an app's own ``./worker.py`` it exits 2 saying so, without
    running that file (worker/launch.py).

    The worker's environment is this process's, with ``REDIS_URL``, ``QUEUES`` (comma-joined ``queues``) and
    ``JOB_MODULES`` (comma-joined ``job_modules``) set when given, then ``env`` on top (e.g. ``{"KEY_PREFIX":
    "test"}``). ``cwd`` (default: the current directory) is where ``JOB_MODULES`` are imported from. Jobs run as in
    production: forked, with retries (a retry's backoff delays the end of the burst) and the failed registry.

    Returns a :class:`BurstResult`; raises ``TimeoutError`` (with the output so far) if the worker is still running
    after ``timeout`` seconds, after killing it and every process it started.
    """
    e = dict(os.environ)
    e["REDIS_URL"] = redis_url
    if queues is not None:
        e["QUEUES"] = ",".join(queues)
    if job_modules is not None:
        e["JOB_MODULES"] = ",".join(job_modules)
    e.update(env or {})
    e.setdefault("PYTHONUNBUFFERED", "1")
    if python is None:  # this package first on the path: -P leaves the working directory off (launch.console adds it)
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        e["PYTHONPATH"] = os.pathsep.join([here] + [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.Popen([python or sys.executable, "-P", "-c", _LAUNCH, "--burst"], env=e, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        out, _ = proc.communicate()
        raise TimeoutError(f"burst worker still running after {timeout:g}s (killed); output:\n{out}") from None
    return BurstResult(proc.returncode, out)


__all__ = ["inline", "InlineJobs", "active", "lookup", "run_burst", "BurstResult"]
