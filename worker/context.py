"""The running job's own context: :func:`current_job` (RQ's ``get_current_job()``, Celery's ``self.request``).

Set by the job child (``child.run``) and by ``worker.testing.inline()`` just before the job function runs, and
cleared after it; ``None`` anywhere else (the worker, a web process, a job's own forked helper is still inside the
job). Imports nothing of the runtime: the child tells it where the stop flag lives (:data:`stop_source`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


def _never() -> bool:
    return False


#: Where ``stop_requested`` is read: the child's stop flag (``child.shutdown_requested``), set by ``child.install``.
stop_source: Callable[[], bool] = _never


@dataclass(frozen=True)
class CurrentJob:
    """The job this code runs in, as its run started (frozen), and whether a stop was requested since (live).

    ``attempt`` is 1-based: the first run is 1, the run after one failed (retried) or lost attempt is 2. A put-back
    after a stop (an interruption) is not an attempt: the run after it has the same ``attempt``. ``get_job(id)
    .attempts`` counts the attempts that ended badly (failed or lost), so inside a run ``attempt`` is always
    ``attempts + 1`` of the record as it was when the run began. ``enqueued_at``: unix seconds when the job became
    runnable (for a retry or a scheduled job: when it was due)."""

    id: str
    name: str
    queue: str
    attempt: int
    enqueued_at: Optional[float]

    @property
    def stop_requested(self) -> bool:
        """True once the worker was told to stop (a TERM, also during ``TERM_GRACE``); False in inline mode."""
        return stop_source()


_current: Optional[CurrentJob] = None


def current_job() -> Optional[CurrentJob]:
    """The running job's :class:`CurrentJob`, or ``None`` outside a job."""
    return _current


def enter(doc: dict, name: str) -> Optional[CurrentJob]:
    """Make the job of payload ``doc`` current; returns the previous one (inline jobs may nest)."""
    global _current
    prev = _current
    attempts = doc.get("attempts")
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 0:
        attempts = 0
    at = doc.get("enqueued_at")
    _current = CurrentJob(str(doc.get("id")), name, doc.get("queue") or "", attempts + 1,
                          float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else None)
    return prev


def leave(prev: Optional[CurrentJob] = None) -> None:
    global _current
    _current = prev
