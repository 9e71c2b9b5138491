"""A Heroku-ready, fork-per-job background worker on Redis.

Public API::

    from worker import job, enqueue, TermException, shutdown_requested

    @job(queue="default", timeout=60, retries=3)
    def send_email(to): ...

    send_email.enqueue("a@example.com")          # or enqueue("send_email", "a@example.com")

Run workers with ``python -m worker`` (see the README for configuration and the SIGTERM contract).
"""
from .child import TermException, checkpoint, last_checkpoint, shutdown_requested
from .jobs import enqueue, enqueue_at, enqueue_in, enqueue_many, job
from .metrics import queue_depth, queue_latency
from .results import Job, get_job

__all__ = ["job", "enqueue", "enqueue_in", "enqueue_at", "enqueue_many", "TermException", "shutdown_requested",
           "checkpoint", "last_checkpoint", "get_job", "Job", "queue_depth", "queue_latency"]
__version__ = "0.1.0"
