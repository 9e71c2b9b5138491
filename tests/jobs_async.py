"""``async def`` jobs for tests/test_async_jobs.py (issue 24 item 7). Events go to Redis lists through
tests.jobs.event (``t``: the job's time.time() at the event)."""
import asyncio
import time

from tests.jobs import event
from worker import TermException, checkpoint, current_job, job, last_checkpoint


async def _sync_between_awaits():
    while True:
        time.sleep(0.01)  # sync code of the task's own: a stop lands here most of the time
        await asyncio.sleep(0)


async def _wait(how):
    if how == "sleep":
        await asyncio.sleep(30)
    elif how == "future":
        await asyncio.get_running_loop().create_future()  # never resolved by anyone
    elif how == "gather":
        await asyncio.gather(asyncio.sleep(30), asyncio.sleep(30))
    elif how == "task":
        await asyncio.wait_for(asyncio.create_task(asyncio.sleep(30)), 60)
    elif how == "sync":
        await _sync_between_awaits()


@job
async def aj_wait(key, how, cleanup=0.2, swallow=False):
    """Waits ``how``; on TermException records it, cleans up ``cleanup`` s awaiting, then re-raises (put back), or
    with ``swallow`` returns "cleaned" (done)."""
    try:
        event(key, "started", attempt=current_job().attempt)
        await _wait(how)
        event(key, "completed")
    except TermException:
        event(key, "term")
        try:
            await asyncio.sleep(cleanup)
        except BaseException as exc:  # a second exception would break the contract: record it
            event(key, "term_again", type=type(exc).__name__)
        event(key, "cleaned")
        if swallow:
            return "cleaned"
        raise
    finally:
        event(key, "finally")


@job
async def aj_add(key, a, b):
    await asyncio.sleep(0.01)
    event(key, "ran", name=current_job().name)
    return {"sum": a + b}


@job(retries=1)
async def aj_fail(key):
    event(key, "ran", attempt=current_job().attempt)
    await asyncio.sleep(0)
    raise ValueError("async failure")


@job
async def aj_resumable(key, items=100):
    """Checkpoints after each item, awaiting between items; resumes from the last checkpoint."""
    start = last_checkpoint(0)
    event(key, "started", at=start)
    for i in range(start, items):
        await asyncio.sleep(0.02)
        checkpoint(i + 1)
        if i + 1 == 5:
            event(key, "five")
    event(key, "finished", at=items)


@job(timeout=1)
async def aj_too_slow(key):
    event(key, "started")
    await asyncio.sleep(30)


@job
async def aj_alloc(key, mb):
    """Allocates ``mb`` MB (every page written), then awaits."""
    buf = bytearray(mb * 1024 * 1024)
    for i in range(0, len(buf), 4096):
        buf[i] = 1
    event(key, "allocated")
    await asyncio.sleep(30)
    del buf


@job
async def aj_flag(key):
    """Awaits until current_job().stop_requested (TERM_GRACE: before the exception), records it, then waits for
    the exception at its await."""
    event(key, "started")
    while not current_job().stop_requested:
        await asyncio.sleep(0.01)
    event(key, "flag")
    try:
        await asyncio.sleep(30)
    except TermException:
        event(key, "term")
        raise
