"""``async def`` jobs in the job child: run with ``asyncio.run``, and a stop delivered as ``TermException`` inside
the coroutine, at its current ``await`` (issue 24 item 7).

How the stop gets in. The child's signal handler (``child._raise_once``) runs in the main thread, which is the
loop's thread, at whatever bytecode it was on. For a sync job it raises there. For a coroutine that would be wrong
most of the time: the loop is usually waiting in ``select`` or running its own machinery, and an exception raised
there tears the loop down instead of reaching the job. So :meth:`Runner.deliver` decides:

* the job's own task is running (its sync code between two awaits, ``asyncio.current_task()`` is it): raise at
  once, exactly as for a sync job;
* otherwise it asks the loop (``call_soon_threadsafe``, safe from a handler: a deque append and a byte on the
  loop's self-pipe, which also wakes its ``select``) to run :meth:`Runner._throw`, which follows the task's chain of
  awaits (a task awaiting another task, e.g. ``wait_for`` or an awaited ``create_task``) down to the future it
  waits on and sets ``TermException`` as that future's exception. The task wakes up with it raised at its
  ``await``, and its ``except TermException`` / ``finally`` run with the loop still alive (cleanup may await).
  A task that is between steps (ready to run, nothing awaited yet) is tried again on the loop's next turn; one
  that never waits on a future (``await asyncio.sleep(0)`` between sync work) is caught in its own code: the child
  re-sends itself the stop signal a moment later (``nudge``), and the handler raises there.

Not ``CancelledError``: the job's ``except TermException`` must run. Awaiting ``asyncio.gather(...)``, the
exception lands on the gathering future (the job's ``await gather`` raises it); the children still running are
cancelled by ``asyncio.run`` as it ends, so their ``finally`` blocks run too. One exception per run, as for sync
jobs: further stop signals are absorbed by the child's handler (``child._state.raised``).

Imports nothing of the runtime (``child`` passes in ``TermException``), and ``asyncio`` only when an async job
runs: the fork server imports this module, and every module it imports is pages each fork shares.
"""
from __future__ import annotations

import inspect
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    import asyncio


def is_async(fn: Callable) -> bool:
    """A job defined with ``async def`` (registered as such by ``@job``)."""
    return inspect.iscoroutinefunction(fn)


class Runner:
    """One async job's run in the child; :attr:`active` while its loop runs (what the stop handler looks at)."""

    active: Optional["Runner"] = None

    def __init__(self, exc_type: type, nudge: Callable[[], None]):
        self.exc_type = exc_type
        self.nudge = nudge     # has the stop handler run again a moment later (child: the RAISE signal re-sent)
        self.nudged = 0.0
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.task: Optional[asyncio.Task] = None
        self.pending = False   # a stop is to be delivered and has not landed yet
        self.scheduled = False

    def run(self, fn: Callable, args, kwargs) -> Any:
        """``asyncio.run`` the job; returns its value (raises what it raised)."""
        import asyncio

        async def main():
            self.loop, self.task = asyncio.get_running_loop(), asyncio.current_task()
            Runner.active = self  # from here the stop handler delivers through deliver(); before, it raises
            return await fn(*args, **kwargs)
        try:
            return asyncio.run(main())
        finally:
            Runner.active = None

    def deliver(self) -> None:
        """Called by the stop handler (main thread, anywhere) once the loop runs the job: raise here if the job's
        task is running its own code, else have the loop throw into the future it awaits. After the job's
        coroutine has ended it does nothing (as a signal after a sync job returned)."""
        asyncio = sys.modules["asyncio"]  # imported by run(); no import machinery inside a signal handler
        task, loop = self.task, self.loop
        if task.done() or loop.is_closed():
            return
        if asyncio.current_task(loop) is task:
            self.pending = False
            raise self.exc_type("worker is shutting down")
        self.pending = True
        self._schedule()

    def _schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon_threadsafe(self._throw)

    def _throw(self) -> None:
        """On the loop, between callbacks: set the exception on the future the job's task (or the task it awaits,
        and so on) waits for."""
        self.scheduled = False
        if not self.pending or self.task.done():
            return
        waiter = _innermost(self.task)
        if waiter is None:  # the task is between steps: again on the loop's next turn, and in its own code
            self._schedule()
            if time.monotonic() - self.nudged > 0.01:
                self.nudged = time.monotonic()
                self.nudge()
            return
        self.pending = False
        waiter.set_exception(self.exc_type("worker is shutting down"))


def _innermost(task: asyncio.Task) -> Optional[asyncio.Future]:
    """The pending future at the end of ``task``'s chain of awaits (a task awaiting a task awaiting a future), or
    None while a task in the chain is between steps. ``_fut_waiter`` is what a task waits on, in both asyncio's C
    and Python tasks."""
    import asyncio
    for _ in range(100):
        waiter = getattr(task, "_fut_waiter", None)
        if waiter is None or waiter.done():
            return None
        if not isinstance(waiter, asyncio.Task):
            return waiter
        task = waiter
    return None


def run_inline(fn: Callable, args, kwargs) -> Any:
    """``testing.inline()``: run an async job to completion in this process; inside a running event loop (an
    async test), on a thread of its own (``asyncio.run`` cannot nest)."""
    import asyncio
    import threading
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(fn(*args, **kwargs))
    out: dict = {}

    def target():
        try:
            out["value"] = asyncio.run(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the caller's thread
            out["error"] = exc
    t = threading.Thread(target=target, name="inline-async-job")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")
