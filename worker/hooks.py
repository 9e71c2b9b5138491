"""Hooks: code of yours that runs in the job's own process around every job (error reporting, metrics, context).

    from worker.hooks import before_job, after_job, on_failure

    @on_failure
    def report(job, exc):                 # the job raised (not a TermException): exc is the exception
        sentry_sdk.capture_exception(exc)

    @after_job
    def timing(job, outcome):             # outcome.status: "done", "failed" or "interrupted"
        ...

Register them in a module of ``JOB_MODULES`` (the fork server imports it; every job child inherits them). They run
in the child: ``before_job`` hooks before the job function, ``on_failure`` hooks when it raised, ``after_job`` hooks
last, whatever happened. A hook that raises is logged (logger ``worker.hooks``) and changes no outcome. The child
leaves with ``os._exit`` right after: flush what your hook buffers (``sentry_sdk.flush()``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

_BEFORE: list = []
_AFTER: list = []
_FAILURE: list = []
log = logging.getLogger("worker.hooks")


@dataclass(frozen=True)
class JobInfo:
    """The job a hook is about."""

    id: str
    name: str
    queue: str
    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    attempts: int = 0


@dataclass(frozen=True)
class HookOutcome:
    """How the run ended, for ``after_job`` hooks."""

    status: str                          # "done", "failed" or "interrupted"
    result: Any = None                   # the return value, when done
    error: Optional[BaseException] = None  # the exception, when failed or interrupted


def before_job(fn: Callable[[JobInfo], Any]) -> Callable:
    _BEFORE.append(fn)
    return fn


def after_job(fn: Callable[[JobInfo, HookOutcome], Any]) -> Callable:
    _AFTER.append(fn)
    return fn


def on_failure(fn: Callable[[JobInfo, BaseException], Any]) -> Callable:
    _FAILURE.append(fn)
    return fn


def active() -> bool:
    return bool(_BEFORE or _AFTER or _FAILURE)


def run_before(info: JobInfo) -> None:
    """The ``before_job`` hooks (in the job child, before the job function)."""
    run(_BEFORE, info)


def run_on_failure(info: JobInfo, exc: BaseException) -> None:
    """The ``on_failure`` hooks (the job raised, not a TermException)."""
    run(_FAILURE, info, exc)


def run_after(info: JobInfo, outcome: HookOutcome) -> None:
    """The ``after_job`` hooks, last, whatever happened."""
    run(_AFTER, info, outcome)


def run(hooks: list, *args) -> None:
    """Call each hook; one that raises (an ``Exception``) is logged and the others still run."""
    for hook in hooks:
        try:
            hook(*args)
        except Exception:
            log.exception("hook %s failed; the job's outcome is unchanged", getattr(hook, "__qualname__", hook))
