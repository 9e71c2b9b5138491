"""The forked child: set up signals, run one job, report the outcome on a pipe, leave with ``os._exit``.

"The parent" below is the worker (supervisor), which signals this process directly and owns every deadline; the
process that forked it is the fork server (``forkserver.py``). The child never talks to Redis for the runtime: the
worker does all bookkeeping from the report (and from the exit status when there is no report: a segfault, an OOM
kill, ``os._exit(3)``).

Signals in the child (its column of ``signals.TABLE``):

* TERM / INT (sent straight to the child by Heroku, by honcho's group kill, by a terminal's Ctrl-C) and the parent's
  RAISE signal all lead to exactly one :class:`TermException`. With ``TERM_GRACE`` > 0 a TERM/INT only makes
  :func:`shutdown_requested` true, and the exception waits for the parent's RAISE signal at the end of the grace.
  Further signals are absorbed: the child never dies of them, and only the parent's deadline ends the budget.
* QUIT, USR1, USR2 are ignored (they are meant for the parent; a group-wide one must not kill the job).
* The child dies with the fork server, which dies with the worker (Linux parent-death signals), so a job never runs
  on unsupervised.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

from . import aio, context, hooks
from . import jobs as _jobs
from . import log as _log
from . import orphans, protocol
from .payload import lone_surrogate, unserializable
from .protocol import MAX_CHECKPOINT, MAX_RESULT
from . import signals
from .signals import RAISE_SIGNAL
from .signals import fast as _fast


class TermException(BaseException):
    """Raised inside a running job when the worker is shutting down (SIGTERM/SIGINT, e.g. a dyno restart).

    It derives from ``BaseException``, so ``except Exception:`` in job code does not swallow it. Catch it to clean
    up within ``TERM_TIMEOUT`` seconds; return normally and the job counts as done, let it propagate and the job is
    put back at the head of its queue to run again.
    """


class _ChildState:
    shutdown = False   # a stop signal arrived (shutdown_requested)
    raised = False     # TermException was raised once; never again
    raise_asked = False  # the worker's RAISE signal arrived (possibly before the job started)
    running = False    # the job function is on the stack; outside it a signal only sets flags
    grace = 0.0
    report_fd = -1     # the report pipe, while a job runs
    writing = False    # a frame is being written: TermException waits until it is whole
    deferred = False   # ... and is raised right after
    resume = None      # the checkpoint an earlier, interrupted run left ("checkpoint" in the payload)
    has_resume = False
    hooks_on = False   # worker.hooks has hooks (known in the fork server, before any fork)
    log_fields = None  # job=/name= for the job's logging records
    inline = False     # worker.testing.inline() is active: checkpoint() is a no-op
    owner = 0          # the pid that runs the job: only it sends the final report (not a process the job forked)


_state = _ChildState()

#: The report pipe's frames (kinds C checkpoint, R report, I interrupted report) are in protocol.py.
_FRAME, _OK = protocol.REPORT_HEAD, protocol.OK_REPORT  # tests/test_units.py reads these names


def checkpoint(value: Any) -> None:
    """Record ``value`` (JSON: an offset, the last id, a dict) as this job's progress.

    Cheap (one write to the pipe the worker reads; no Redis call), so it may be called after every item. If the
    run is interrupted (``TermException``, the TERM_TIMEOUT kill, a timeout or USR1 kill, or the whole dyno killed),
    the job goes back with the last value recorded (for a dyno killed outright: as of the worker's last heartbeat),
    and :func:`last_checkpoint` returns it in the next run. A job that finishes or fails discards it.
    """
    if _state.report_fd < 0:
        if _state.inline:
            return
        raise RuntimeError("checkpoint() works only inside a job run by the worker")
    data = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_CHECKPOINT:
        raise ValueError(f"checkpoint is {len(data)} bytes of JSON, over {MAX_CHECKPOINT}: save a cursor, not data")
    if b"\\ud" in data:  # refused here, not at the next claim (issue 27 item 4): Redis's JSON cannot read it
        bad = lone_surrogate(value)
        if bad is not None:
            raise ValueError(f"checkpoint contains a lone surrogate ({bad!r}), which Redis's JSON cannot read; "
                             f"pass text as valid Unicode (bytes: e.g. base64)")
    _write_frame(protocol.CHECKPOINT, data)


def last_checkpoint(default: Any = None) -> Any:
    """The value an earlier, interrupted run of this job passed to :func:`checkpoint` last; ``default`` on the
    first run (or outside a job)."""
    return _state.resume if _state.has_resume else default


_lock = threading.Lock()


def _write_frame(kind: bytes, data: bytes) -> None:
    """One whole frame on the report pipe, one writer at a time (jobs may checkpoint from threads). A TermException
    that arrives while the main thread writes is raised once the frame is whole, so the worker never reads half a
    frame (the signal handler runs in the main thread only)."""
    main = threading.current_thread() is threading.main_thread()
    with _lock:
        if main:
            _state.writing = True
        try:
            view = memoryview(protocol.report_frame(kind, data))
            while view:
                view = view[os.write(_state.report_fd, view):]
        finally:
            if main:
                _state.writing = False
    if main and _state.deferred:
        _state.deferred = False
        _raise_once()


def shutdown_requested() -> bool:
    """True inside a job from the first stop signal on (also during ``TERM_GRACE``, before the exception)."""
    return _state.shutdown


def _raise_once():
    if _state.writing:
        _state.deferred = True
        return
    runner = aio.Runner.active  # an async job: into its coroutine, at its current await (aio.py)
    if runner is not None and _state.running and (not _state.raised or runner.pending):
        _state.raised = True
        runner.deliver()  # raises here if the job's own code runs; else the loop delivers it (or a nudge, again)
        return
    if _state.running and not _state.raised:
        _state.raised = True
        raise TermException("worker is shutting down")


def _on_stop(signum, frame):
    _state.shutdown = True
    if _state.grace <= 0:
        _raise_once()


def _on_raise(signum, frame):
    _state.shutdown = True
    _state.raise_asked = True
    _raise_once()


_app_unraisablehook = sys.unraisablehook


def _on_unraisable(unraisable) -> None:
    """Python drops an exception raised inside a finalizer (a ``__del__``, a weakref or garbage-collector callback)
    and reports it here. The stop signal's handler runs wherever the job's main thread is, and a garbage collection
    can run a finalizer anywhere, so a TermException can land there: the job never sees it and would run on to the
    deadline kill. Deliver it again, from outside the finalizer: a thread re-sends the RAISE signal a moment later,
    and the handler runs at the main thread's next bytecode (in another finalizer: this repeats)."""
    if not (isinstance(unraisable.exc_value, TermException) and _state.running and _state.raised
            and os.getpid() == _state.owner):
        _app_unraisablehook(unraisable)
        return
    for _ in range(3):  # the re-sent signal could land in this very hook, which would drop it too
        try:
            _state.raised = False
            threading.Thread(target=_raise_again, daemon=True).start()
            return
        except TermException:
            continue


def _nudge() -> None:
    """An async job's stop is still to be delivered and its task never waits on a future (``await sleep(0)``
    between sync work): the RAISE signal again, a moment later, lands in the task's own code (aio.py)."""
    threading.Thread(target=_raise_again, daemon=True).start()


def _raise_again() -> None:
    time.sleep(0.002)  # the hook has returned by then: the exception lands in the job's code
    os.kill(os.getpid(), RAISE_SIGNAL)


_libc = None
try:  # loaded once in the fork server, so the child pays nothing for it
    _libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
except OSError:
    pass


def die_with_parent() -> bool:
    """Have Linux SIGKILL this process when the process that forked it dies (PR_SET_PDEATHSIG): a job never runs on
    unsupervised. False where there is no such call (not Linux)."""
    if _libc is None:
        return False
    _libc.prctl(1, signal.SIGKILL)
    return True


def set_inline(on: bool) -> None:
    """``worker.testing.inline()`` is active (``on``): :func:`checkpoint` is a no-op outside a worker's child."""
    _state.inline = on


def install(grace: float) -> None:
    """Install the child's signal dispositions once, in the fork server, before any fork.

    The fork server keeps these signals blocked, so the handlers never run there; every child inherits them and
    the blocked mask, and :func:`run` unblocks. Doing this once saves each child a dozen calls on the hot path.
    """
    global _app_unraisablehook
    _state.grace = grace
    _app_unraisablehook = sys.unraisablehook  # the app's own, if its import set one: ours hands everything else on
    sys.unraisablehook = _on_unraisable
    context.stop_source = shutdown_requested  # current_job().stop_requested reads the child's flag
    _state.hooks_on = hooks.active()  # hooks are registered by the app's import, which is done by now
    _log.context_source = lambda: _state.log_fields  # read when a record is formatted: nothing written per job
    handlers = {signals.DEFAULT: _fast.SIG_DFL, signals.IGNORE: _fast.SIG_IGN, "stop": _on_stop, "raise": _on_raise}
    for sig, action in signals.actions(signals.CHILD):  # the job child's column of the one table
        _fast.signal(sig, handlers[action])


def setup(parent_pid: int) -> None:
    """First thing after fork in the child (the stop signals are still blocked by the fork server's mask).
    ``parent_pid`` is the process that forked us.

    The child leads a process group of its own, so a kill (timeout, USR1, memory, the TERM deadline) reaches every
    process the job started too. Consequence: a terminal's Ctrl-C reaches the worker, which forwards the stop."""
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    orphans.become_subreaper()  # what the job's helpers orphan stays below us (orphans.py), not another job's
    if die_with_parent() and os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(1)


def run_payload(data: bytes, report_fd: int) -> None:
    """Decode the payload the worker claimed (it checked the JSON's shape), bind its arguments and run it. A job the
    worker could not check (arguments that do not fit the function) is reported as ``bad``. Never returns."""
    _state.owner = os.getpid()
    doc = json.loads(data.decode("utf-8", "surrogateescape"))
    spec = _jobs.registered(doc["name"])
    problem = None
    if spec is None:
        problem = f"job name {doc['name']!r} is not registered (JOB_MODULES)"
    else:
        try:
            extra = {"results": []} if "gdone" in doc else {}  # a group's callback: results= come in run()
            if spec.fits is not None:
                spec.fits(*doc["args"], **doc["kwargs"], **extra)
            else:
                spec.signature.bind(*doc["args"], **doc["kwargs"], **extra)
        except TypeError as exc:
            problem = f"arguments do not fit {spec.name}{spec.signature}: {str(exc).replace('fits()', 'the job')}"
    if problem is not None:
        _finish({"status": "bad", "type": "BadJob", "message": problem}, report_fd)
    run(spec, doc, report_fd)


def run(spec, doc, report_fd: int) -> None:
    """Run the job (with the hooks of ``worker.hooks``, if any) and exit. Never returns."""
    _state.report_fd = report_fd
    if "checkpoint" in doc:
        _state.resume, _state.has_resume = doc["checkpoint"], True
    _state.log_fields = {"job": doc["id"], "name": spec.name}  # on every logging record of the job's own code
    context.enter(doc, spec.name)  # current_job(); never left: the child exits after the job
    info = hooks.JobInfo(doc["id"], spec.name, doc.get("queue") or "", doc["args"], doc["kwargs"],
                         doc.get("attempts") or 0) if _state.hooks_on else None
    try:
        _fast.pthread_sigmask(signal.SIG_SETMASK, ())  # pending TERM/INT (sent during fork) fire now
        try:
            _state.running = True
            if _state.shutdown and (_state.grace <= 0 or _state.raise_asked):  # arrived before the job started
                _raise_once()
            if "gdone" in doc:  # a group's callback (issue 25 item 4): its members' results, read now
                from . import jobgroups
                doc["kwargs"]["results"] = jobgroups.callback_results(doc)
            if info is not None:
                hooks.run_before(info)
            if spec.is_async:
                value = aio.Runner(TermException, _nudge).run(spec.fn, doc["args"], doc["kwargs"])
            else:
                value = spec.fn(*doc["args"], **doc["kwargs"])
        finally:
            _state.running = False
        report, outcome = _returned_outcome(info, value, spec.strict_result)
    except TermException as exc:
        report, outcome = {"status": "interrupted"}, hooks.HookOutcome("interrupted", error=exc)
    except BaseException as exc:  # job code may raise anything (SystemExit and KeyboardInterrupt included)
        report, outcome = _raised_outcome(info, exc, spec)
    if info is not None:
        hooks.run_after(info, outcome)
    _finish(report, report_fd)


def _returned_outcome(info, value, strict: bool):
    """``(report, hooks' outcome)`` of a job that returned ``value``; the report None for success (the constant
    OK_REPORT, no encoding on the hot path), the outcome None without hooks."""
    report = None if value is None else _returned(value, strict)
    if info is None:
        return report, None
    if report is not None and report["status"] == "error":  # a return value that cannot be kept
        failure = ValueError(report["message"])
        hooks.run_on_failure(info, failure)
        return report, hooks.HookOutcome("failed", error=failure)
    return report, hooks.HookOutcome("done", result=value)


def _raised_outcome(info, exc: BaseException, spec):
    """``(report, hooks' outcome)`` of a job that raised ``exc`` (called while it is handled: its traceback). The
    report says ``"retryable": false`` when ``@job(dont_retry=/retry_on=)`` rules out a retry of ``exc``."""
    report = {"status": "interrupted" if _state.raised else "error", "type": type(exc).__name__,
              "message": str(exc)[:2000], "traceback": traceback.format_exc()[-20000:]}
    if not _state.raised and not spec.retryable(exc):
        report["retryable"] = False
    if info is None:
        return report, None
    if not _state.raised:
        hooks.run_on_failure(info, exc)
    return report, hooks.HookOutcome("interrupted" if _state.raised else "failed", error=exc)


FLUSH_LIMIT = 5  # seconds the child may take to flush the job's output after its report (then SIGALRM ends it)


def _returned(value, strict: bool = False) -> dict:
    """The report of a job that returned ``value``: kept as its result if it is JSON; else done with a marker and a
    warning (``payload.unserializable``), or with ``strict`` (``@job(strict_result=True)``) a failure saying so."""
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        if not strict:
            marker, warning = unserializable(value, exc)
            return {"status": "ok", "result": marker, "warning": warning}
        return {"status": "error", "type": "ResultNotJSON",
                "message": f"the job's return value is not JSON ({type(exc).__name__}: {exc}); return JSON data "
                           f"(dict, list, str, int, float, bool or None)"}
    if len(text) > MAX_RESULT:
        return {"status": "error", "type": "ResultTooLarge",
                "message": f"the job's return value is {len(text)} bytes of JSON, over {MAX_RESULT}; store large "
                           f"results elsewhere and return a reference"}
    return {"status": "ok", "result": value}


def _finish(report, fd):
    """Send the final report, flush the job's output, exit.

    The report comes first: the worker records the job as soon as it has read it, so a job that did its work is
    done even if flushing its output then blocks (a stalled pipe); the fork server gives a child that is still
    flushing a moment when the worker leaves (``forkserver.py``). Only the job's own process reports: a process the
    job forked (``os.fork``) that returns or exits through here leaves without a word, so its report can never be
    taken for the job's. A flush that takes over ``FLUSH_LIMIT`` s ends the child (SIGALRM). Then the fork server
    ends its process group, and what it left in other sessions (``orphans.py``)."""
    code = 0
    if os.getpid() == _state.owner:
        try:
            if not _lock.acquire(timeout=5):  # a thread of the job still writes a checkpoint: never mix into it
                raise TimeoutError("report pipe busy")
            if report is None:
                data = memoryview(protocol.OK_REPORT)
            else:
                body = json.dumps(report, default=str).encode()
                kind = protocol.INTERRUPTED if report.get("status") == "interrupted" else protocol.REPORT
                data = memoryview(protocol.report_frame(kind, body))
            while data:  # the parent reads while we write, so a report larger than the pipe buffer cannot block
                data = data[os.write(fd, data):]
        except BaseException:
            code = 70
    try:  # a flush that blocks (a stalled pipe) must not keep the job's process group alive for ever
        _fast.signal(signal.SIGALRM, _fast.SIG_DFL)
        signal.alarm(FLUSH_LIMIT)
    except BaseException:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(code)
