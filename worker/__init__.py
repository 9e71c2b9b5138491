"""A Heroku-ready, fork-per-job background worker on Redis.

Public API::

    from worker import job, enqueue, TermException, shutdown_requested

    @job(queue="default", timeout=60, retries=3)
    def send_email(to): ...

    send_email.enqueue("a@example.com")          # or enqueue("send_email", "a@example.com")

Run workers with ``python -m worker`` (see the README for configuration and the SIGTERM contract).
"""
from .child import TermException, checkpoint, last_checkpoint, shutdown_requested
from .context import current_job
from .jobs import (enqueue, enqueue_async, enqueue_at, enqueue_at_async, enqueue_in, enqueue_in_async, enqueue_many,
                   job)

# Imported on first use: the fork server (and every job child it forks) imports this package, and stays lean only
# if redis-py and the status code are not pulled in with it (each imported module is pages every fork copies).
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers see; at run time these load on first use (below)
    from .metrics import queue_depth, queue_latency
    from .results import Job, get_job, get_job_async
    from .control import cancel
    from .jobgroups import get_group, group

_LAZY = {"cancel": "control", "get_job": "results", "get_job_async": "results", "Job": "results",
         "queue_depth": "metrics", "queue_latency": "metrics", "group": "jobgroups", "get_group": "jobgroups"}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'worker' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = ["job", "enqueue", "enqueue_in", "enqueue_at", "enqueue_many", "TermException", "shutdown_requested",
           "checkpoint", "last_checkpoint", "current_job", "enqueue_async", "enqueue_in_async",
           "enqueue_at_async", "get_job_async", "get_job", "Job", "cancel", "queue_depth", "queue_latency",
           "group", "get_group"]
__version__ = "0.2.0"
