"""Per-call options (issue 24 items 3 and 4): ``f.options(queue=, delay=, timeout=, retries=, job_id=, result_ttl=,
max_interruptions=)`` returns a :class:`JobCall`, whose ``.enqueue`` / ``.enqueue_in`` / ``.enqueue_at`` take the
function's own arguments (typed like it: ``jobtypes.JobCall``), so the options never mix with the job's keyword
arguments. Everything is checked when ``.options()`` is called (TypeError/ValueError naming the option). The
options travel in the payload's ``"options"`` (``payload.PER_CALL``) and win over ``@job``'s in
``jobs.JobOptions.resolve``; ``job_id`` is the payload's id, deduplicated by enqueue.lua while its job has not ended.

Imports no enqueue machinery: ``jobs.options`` hands a JobCall the functions that enqueue (``jobs._push``, and
``jobs._push_async`` for the ``*_async`` methods async web apps await).
"""
from __future__ import annotations

from typing import Any, Callable

from .config import QUEUE_RULE, valid_queue_name
from .payload import check_job_id, check_options, delay_of, due_of


class JobCall:
    """One call's options, checked when made; its enqueue methods return the job id."""

    __slots__ = ("name", "push", "push_async", "queue", "delay", "job_id", "opts")

    def __init__(self, name: str, push: Callable, push_async: Callable = None, *, queue=None, delay=None, job_id=None, timeout=None,
                 retries=None, result_ttl=None, max_interruptions=None):
        if queue is not None and (not isinstance(queue, str) or not valid_queue_name(queue)):
            raise ValueError(f"options: invalid queue {queue!r}: expected {QUEUE_RULE}")
        self.delay = None if delay is None else delay_of(delay)
        if self.delay is not None and self.delay < 0:
            raise ValueError(f"options: delay= must be >= 0 seconds, not {delay!r}")
        self.name, self.push, self.push_async, self.queue = name, push, push_async, queue
        self.job_id = None if job_id is None else check_job_id(job_id)
        self.opts = check_options(dict(timeout=timeout, retries=retries, result_ttl=result_ttl,
                                       max_interruptions=max_interruptions))

    def _send(self, args, kwargs, **when) -> str:
        return self.push(self.name, args, kwargs, queue=self.queue, job_id=self.job_id, options=self.opts or None,
                         **when)

    def _send_async(self, args, kwargs, **when):
        return self.push_async(self.name, args, kwargs, queue=self.queue, job_id=self.job_id,
                               options=self.opts or None, **when)

    def _no_delay(self, method: str) -> None:
        if self.delay is not None:
            raise TypeError(f"{method}: this call has options(delay=) already; use .enqueue()")

    def enqueue(self, *args: Any, **kwargs: Any) -> str:
        """Enqueue now (or ``delay`` seconds from now). With ``job_id``: while a job of that id is queued,
        scheduled or running, nothing is enqueued and the id is returned."""
        return self._send(args, kwargs, delay=self.delay)

    def enqueue_in(self, seconds, /, *args: Any, **kwargs: Any) -> str:
        self._no_delay("enqueue_in")
        return self._send(args, kwargs, delay=delay_of(seconds))

    def enqueue_at(self, when, /, *args: Any, **kwargs: Any) -> str:
        self._no_delay("enqueue_at")
        return self._send(args, kwargs, due=due_of(when))

    # the same for async code (await), on redis-py's asyncio client (worker/aio_broker.py): the same checks

    async def enqueue_async(self, *args: Any, **kwargs: Any) -> str:
        return await self._send_async(args, kwargs, delay=self.delay)

    async def enqueue_in_async(self, seconds, /, *args: Any, **kwargs: Any) -> str:
        self._no_delay("enqueue_in_async")
        return await self._send_async(args, kwargs, delay=delay_of(seconds))

    async def enqueue_at_async(self, when, /, *args: Any, **kwargs: Any) -> str:
        self._no_delay("enqueue_at_async")
        return await self._send_async(args, kwargs, due=due_of(when))

    def call(self, *args: Any, **kwargs: Any) -> "PendingJob":
        """A not-yet-enqueued call with these options, for ``worker.group`` (no ``delay`` or ``job_id``: a group's
        members are queued at once, with ids of the group's making)."""
        if self.delay is not None or self.job_id is not None:
            raise TypeError("call: a group's member or callback takes no delay= or job_id= option")
        self.push(self.name, args, kwargs, queue=self.queue, check_only=True)
        return PendingJob(self.name, tuple(args), dict(kwargs), self.queue, self.opts or None)


class PendingJob:
    """``f.call(*args, **kwargs)``: one call of job ``name``, checked (its name and arguments) but not enqueued;
    ``worker.group`` enqueues such calls (issue 25 item 4)."""

    __slots__ = ("name", "args", "kwargs", "queue", "options")

    def __init__(self, name: str, args: tuple, kwargs: dict, queue=None, options=None):
        self.name, self.args, self.kwargs, self.queue, self.options = name, args, kwargs, queue, options

    def __repr__(self) -> str:
        return f"<call {self.name}(*{self.args!r}, **{self.kwargs!r})>"
