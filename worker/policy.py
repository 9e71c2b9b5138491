"""What a finished job's run means, and what to do about it: pure functions, testable without forking.

:func:`result_of` turns what the worker saw of a child (its report, its wait status, why the worker killed it)
into a typed :class:`Result`; :func:`decide` turns a result into the :class:`~worker.fetch.Outcome` to record
(done, retried with backoff, failed, or put back) and the log event that says so.
"""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, replace
from enum import Enum
from typing import Optional

from . import jobs
from .claimed import ClaimedJob
from .failed import record as failed_record
from .fetch import Outcome, backoff_delay
from .payload import HISTORY_KEEP, history_entry


class Status(str, Enum):
    DONE = "ok"                    # the job returned
    ERROR = "error"                # it raised
    INTERRUPTED = "interrupted"    # stopped by a shutdown (TermException, or killed at the TERM deadline)
    BAD = "bad"                    # it cannot run: not JSON, unknown name, arguments that do not fit
    TIMEOUT = "timeout"            # killed at its own time limit
    KILLED = "killed"              # killed by SIGUSR1 to the worker
    MEMORY = "memory"              # killed for passing JOB_MAX_MEMORY_MB
    CRASH = "crash"                # died without a report (segfault, OOM killer, os._exit)
    LOST = "lost"                  # the fork server died under it: not the job's fault, a lost attempt (as recovery)
    CANCELED = "canceled"          # cancel(running=True) stopped it (TermException, or killed TERM_TIMEOUT later)


class Kill(Enum):
    """Why the worker killed a child (at most one reason per child: the first)."""

    DEADLINE = "deadline"      # the stop timeline's last step (stops.py)
    TIMEOUT = "timeout"        # the job's own time limit
    USR1 = "usr1"
    MEMORY = "memory"
    FORKSERVER = "forkserver"  # the fork server died or stalled: its children died with it
    LOST = "lost"              # its claim was recovered by another worker: the run is not ours to finish or record
    CANCEL = "cancel"          # cancel(running=True): TermException was not enough within TERM_TIMEOUT


@dataclass(frozen=True)
class Result:
    status: Status
    duration: float = 0.0
    type: Optional[str] = None
    message: Optional[str] = None
    traceback: Optional[str] = None
    value: str = ""  # DONE: the return value as JSON text ('' for None)
    warning: Optional[str] = None  # DONE: the result was replaced by a marker (not JSON; payload.unserializable)
    retryable: bool = True  # ERROR: False when the job's dont_retry/retry_on rule out a retry (decided in the child)

    def fields(self) -> dict:
        return {"type": self.type, "message": self.message, "traceback": self.traceback}


KEEP_BAD = 64 * 1024  # characters of an unreadable entry kept in its failure record


def _text(value) -> Optional[str]:
    return None if value is None else str(value)[:20000]


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"child killed by {name}"
    return f"child exited with code {os.WEXITSTATUS(status)} without reporting"


_REPORTED = {"ok": Status.DONE, "error": Status.ERROR, "interrupted": Status.INTERRUPTED, "bad": Status.BAD}


def result_of(data: bytes, status: Optional[int], killed: Optional[Kill], termed: bool, timeout: float,
              limit_mb: int, duration: float) -> Result:
    """The :class:`Result` of one child: its own report wins; else why we killed it; else how it died."""
    report = None
    if data:
        try:
            report = json.loads(data)
        except (ValueError, RecursionError):  # the child is the app's code: whatever it wrote, never trusted
            report = None
    if isinstance(report, dict) and report.get("status") in _REPORTED:
        try:
            value = report.get("result")
            text = "" if value is None else json.dumps(value, separators=(",", ":"))
        except (ValueError, TypeError, RecursionError):
            return Result(Status.ERROR, duration, "ResultNotJSON", "the job's return value could not be kept")
        return Result(_REPORTED[report["status"]], duration, _text(report.get("type")), _text(report.get("message")),
                      _text(report.get("traceback")), text, _text(report.get("warning")),
                      report.get("retryable") is not False)
    if killed is Kill.DEADLINE or (termed and killed in (Kill.TIMEOUT, Kill.USR1)):
        return Result(Status.INTERRUPTED, duration, message="killed at the TERM_TIMEOUT deadline")
    if killed is Kill.TIMEOUT:
        return Result(Status.TIMEOUT, duration, "JobTimeout", f"timed out after {timeout:g} s")
    if killed is Kill.MEMORY:
        return Result(Status.MEMORY, duration, "JobMemoryExceeded",
                      f"exceeded {limit_mb} MB (JOB_MAX_MEMORY_MB) and was killed")
    if killed is Kill.FORKSERVER:
        if termed:  # the stop had begun: the job was being interrupted anyway, and goes back like a killed one
            return Result(Status.INTERRUPTED, duration, message="the fork server died during the shutdown")
        return Result(Status.LOST, duration, "ForkServerLost", "the fork server died during the job")
    if killed is Kill.USR1:
        return Result(Status.KILLED, duration, "Killed", "killed by SIGUSR1 to the worker")
    how = "its final report could not be read" if status is None else describe_status(status)
    if termed:  # died some other way during a shutdown: it was interrupted, not broken
        return Result(Status.INTERRUPTED, duration, message=how)
    return Result(Status.CRASH, duration, "ChildCrashed", how)


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    event: str        # the log event: job.done, job.retry, job.failed, job.bad, shutdown.job_put_back
    level: str        # info or warning
    fields: dict
    notes: tuple = ()  # further log lines: (level, event, fields)


def decide(result: Result, job: ClaimedJob, worker: str, checkpoint: Optional[str] = None,
           elapsed: Optional[float] = None) -> Decision:
    """The finished :class:`Decision` for a run of ``job`` (its options resolved: ``retries``,
    ``max_interruptions``, ``result_ttl``, ``max_attempts``). ``checkpoint``: the last progress the run reported
    (JSON text), which goes back with the job if it runs again (put back, retried) and into its failure record, and
    is discarded when it is done; ``elapsed``: seconds since the stop signal, shown when it is put back."""
    doc, opts = job.doc, job.options
    base = dict(job=job.id, name=job.name, queue=job.queue, duration=result.duration)
    if result.status is Status.DONE:
        notes = () if result.warning is None else (
            ("warning", "job.result_unserializable", dict(job=job.id, name=job.name, warning=result.warning)),)
        return _decision(job, Outcome.ack(job.raw, job.slot, job.id, result.value, int(opts.result_ttl * 1000),
                                          result.warning or ""), "job.done", "info",
                         dict(outcome="done", **base, **{f"measure#jobs.{job.name}.duration": _ms(result.duration)}),
                         notes)
    if result.status is Status.CANCELED:  # not put back, not retried: the run ends here (issue 24 item 2)
        return _decision(job, Outcome.cancel(job.raw, job.slot, job.id, int(opts.result_ttl * 1000)),
                         "job.canceled", "info", dict(outcome="canceled", **base))
    progress = _progress(doc, checkpoint)
    if result.status is Status.INTERRUPTED:
        return _interrupted(job, worker, checkpoint, progress, base, elapsed)
    if result.status is Status.LOST:
        return _lost(result, job, worker, progress, base)
    attempts = int(doc.get("attempts") or 0) + 1
    history = _history(doc, {"at": time.time(), "worker": worker, "cause": result.status.value,
                             "type": _clean(result.type), "message": _clean(result.message)})
    if result.status is Status.BAD:
        return bad(job.raw, job.id, job.queue, worker, result.message or "", job.slot, job.name, job.claimed_ms)
    if attempts <= opts.retries and result.retryable:
        delay = backoff_delay(attempts)
        new_doc = _again(doc, job.queue, attempts=attempts, errors=history, enqueued_at=round(time.time() + delay, 6),
                         **progress)
        return _decision(job, Outcome.retry(job.raw, jobs.json_dumps(new_doc), delay, job.slot, job.id, attempts),
                         "job.retry", "warning",
                         dict(outcome=result.status.value, attempt=attempts, delay=delay, error=result.message, **base))
    rec = dict(failed_record(job.raw, job.id, job.name, job.queue, worker, attempts, result.status.value,
                             result.fields(), history), **progress)
    extra = {} if result.retryable else {"retryable": False}  # dont_retry/retry_on: failed at once
    return _decision(job, Outcome.fail(job.raw, job.id, dict(rec, **extra), job.slot, attempts), "job.failed",
                     "warning", dict(outcome=result.status.value, attempts=attempts, error=result.message, **base,
                                     **extra))


def _decision(job: Optional[ClaimedJob], outcome: Outcome, event: str, level: str, fields: dict, notes=(),
              started_ms: int = 0) -> Decision:
    """Every Decision about a claimed job is made here: its outcome carries the job's ``started_at`` as the claim's
    reply gave it (spares the script a read)."""
    started_ms = job.claimed_ms if job is not None else started_ms
    if started_ms:
        outcome = replace(outcome, started_ms=started_ms)
    return Decision(outcome, event, level, fields, tuple(notes))


def _ms(seconds: float) -> str:
    """A duration in l2met's form (``measure#…=12.3ms``)."""
    return f"{seconds * 1000:.1f}ms"


def _progress(doc: dict, checkpoint: Optional[str]) -> dict:
    """``{"checkpoint": value}`` to carry on: the run's last one, else the one it was given, else nothing."""
    if checkpoint is not None:
        try:
            return {"checkpoint": json.loads(checkpoint)}
        except (ValueError, RecursionError):
            pass
    return {"checkpoint": doc["checkpoint"]} if "checkpoint" in doc else {}


def _interrupted(job, worker, checkpoint, progress, base, elapsed) -> Decision:
    """Put back with its progress, counting an interruption (not an attempt); past ``max_interruptions`` failed."""
    doc, limit = job.doc, job.options.max_interruptions
    prev = doc.get("interruptions")
    n = (prev if isinstance(prev, int) and not isinstance(prev, bool) and prev >= 0 else 0) + 1
    notes = []
    if checkpoint is not None:
        notes.append(("info", "job.checkpointed", dict(job=job.id, checkpoint=checkpoint[:200])))
    if "checkpoint" in doc and progress.get("checkpoint") == doc["checkpoint"]:
        notes.append(("warning", "job.no_progress", dict(job=job.id, interruptions=n,
                                                         note="same checkpoint as when this run started")))
    if limit and n > limit:
        message = f"interrupted {n} times without finishing; make it resumable or shorter"
        attempts = int(doc.get("attempts") or 0)
        rec = dict(failed_record(job.raw, job.id, job.name, job.queue, worker, attempts, "interrupted",
                                 {"type": "TooManyInterruptions", "message": message},
                                 list(doc.get("errors") or [])), interruptions=n, **progress)
        return _decision(job, Outcome.fail(job.raw, job.id, rec, job.slot, attempts), "job.failed", "warning",
                         dict(outcome="interrupted", interruptions=n, error=message, **base), notes)
    new = jobs.json_dumps(_again(doc, job.queue, interruptions=n, **progress))
    return _decision(job, Outcome.requeue(job.raw, job.queue, job.slot, new, job.id), "shutdown.job_put_back",
                     "info", dict(outcome="requeued", interruptions=n, **base, elapsed=elapsed), notes)


def _lost(result, job, worker, progress, base) -> Decision:
    """The run was lost with the fork server (not the job's fault): counted as a lost attempt, exactly as recovery
    counts a vanished worker's job (``lua.RECOVER``): back to the head of its queue with ``attempts`` + 1 and the
    loss in its history, or failed once ``MAX_ATTEMPTS`` is reached; never a retry's backoff, never ``retries``."""
    doc, max_attempts = job.doc, job.options.max_attempts
    prev = doc.get("attempts")
    a = prev if isinstance(prev, int) and not isinstance(prev, bool) and prev >= 0 else 0
    a = min(a, max_attempts) + 1
    history = _history(doc, {"at": time.time(), "worker": worker, "cause": "lost", "type": _clean(result.type),
                             "message": _clean(result.message)})
    if a < max_attempts:
        new = jobs.json_dumps(_again(doc, job.queue, attempts=a, errors=history, **progress))
        return _decision(job, Outcome.requeue(job.raw, job.queue, job.slot, new, job.id, attempts=a), "job.lost",
                         "warning", dict(outcome="requeued", attempt=a, error=result.message, **base))
    message = f"lost {a} times while running the job (MAX_ATTEMPTS): {result.message}"
    rec = dict(failed_record(job.raw, job.id, job.name, job.queue, worker, a, "lost",
                             {"type": result.type, "message": message}, history), **progress)
    return _decision(job, Outcome.fail(job.raw, job.id, rec, job.slot, a), "job.failed", "warning",
                     dict(outcome="lost", attempts=a, error=message, **base))


def _again(doc: dict, queue: str, **fields) -> dict:
    """The payload of a job that runs again (retried, put back). Invariants enforced here:

    * its ``queue`` is the queue it was claimed from, whatever its payload said (issue 27 item 6: a foreign payload
      with no or another ``queue`` must not move queues when the schedule moves its retry);
    * it carries each runtime field once: the marker of a recovery's appended fragment (``_rt``, see
      ``lua.RECOVER``) goes, since this re-encoding already folds the duplicates into one."""
    out = dict(doc, queue=queue, **fields)
    out.pop("_rt", None)
    return out


def _history(doc: dict, new: dict) -> list:
    """The error history to carry on: the last HISTORY_KEEP - 1 entries, trimmed, and ``new`` (issue 27 item 3)."""
    old = doc.get("errors") if isinstance(doc.get("errors"), list) else []
    kept = [e for e in (history_entry(x) for x in old[-(HISTORY_KEEP - 1):]) if e is not None]
    return kept + [history_entry(new) or {}]


def _clean(text: Optional[str]) -> Optional[str]:
    """Text safe to put in a payload: a lone surrogate (an exception message quoting an undecodable file name)
    would make the payload unreadable to Redis's cjson, which must read a retried job's queue."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if text else text


UNKNOWN_RETRY_MAX = 30.0  # seconds at most between two looks at a job whose name is not registered here


def unknown(raw: str, doc: dict, queue: str, slot: int, worker: str, grace: float,
            now: Optional[float] = None) -> Decision:
    """A job whose name this worker does not register (issue 21 item 6: in a rolling deploy, a new web dyno enqueues
    a job the old worker dyno does not know yet). Invariants enforced here:

    * for ``grace`` seconds (UNKNOWN_JOB_GRACE) from the first time a worker saw it (``unknown_since`` in its
      payload), it goes back to the queue it was claimed from through the schedule, at most UNKNOWN_RETRY_MAX
      seconds later each time, without counting an attempt;
    * after that it is failed as a bad payload, with its name in the record."""
    now = time.time() if now is None else now
    first = doc.get("unknown_since")
    if not isinstance(first, (int, float)) or isinstance(first, bool) or not first <= now:
        first = now
    waited = now - first
    reason = f"job name {doc['name']!r} is not registered (JOB_MODULES)"
    if waited >= grace:
        if grace:
            reason += f" by any worker that took it within UNKNOWN_JOB_GRACE={grace:g} s"
        return bad(raw, doc["id"], queue, worker, reason, slot, name=doc["name"])
    delay = min(UNKNOWN_RETRY_MAX, max(1.0, waited), max(0.1, grace - waited))
    new = _again(doc, queue, unknown_since=round(first, 6), enqueued_at=round(now + delay, 6))
    attempts = int(doc.get("attempts") or 0)
    return Decision(Outcome.retry(raw, jobs.json_dumps(new), delay, slot, doc["id"], attempts), "job.unknown_name",
                    "warning", dict(job=doc["id"], name=doc["name"], queue=queue, retry_in=round(delay, 3),
                                    waited=round(waited, 3), grace=grace,
                                    note="not registered in this worker (a deploy in progress?): put back"))


def bad(raw: str, job_id: str, queue: str, worker: str, reason: str, slot: int = 0, name: str = "",
        started_ms: int = 0) -> Decision:
    """A queue entry that cannot run: straight to the failed registry (never retried), with the reason."""
    rec = failed_record(raw[:KEEP_BAD], job_id, name, queue, worker, 1, "bad_payload",
                        {"type": "BadJob", "message": reason}, [])
    if len(raw) > KEEP_BAD:  # a huge entry: keep its head for diagnosis, not the whole of it
        rec["payload_truncated"] = len(raw)
    return _decision(None, Outcome.fail(raw, job_id, rec, slot, 1), "job.bad", "warning",
                     dict(job=job_id, queue=queue, reason=reason), started_ms=started_ms)
