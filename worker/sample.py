"""The sample jobs: the Python twin of Resque's classic TERM_CHILD example, and a resumable long job.

``sample_work`` works for ``seconds``; if the worker is told to stop meanwhile, :class:`TermException` arrives
inside it, and it spends ``cleanup`` seconds cleaning up before returning normally (so the job counts as done).

``resumable_work`` walks ``items`` items, recording a checkpoint after each; stopped, it cleans up and lets the
exception propagate, so the job is put back with its checkpoint and the next run continues where this one stopped.

``sample_async_work`` is ``sample_work``'s ``async def`` twin: the TermException arrives at its current ``await``.
"""
import sys
import time

from . import TermException, checkpoint, job, last_checkpoint


def _say(text):
    # One write per line: print() writes text and newline separately when unbuffered, and the worker's own log
    # lines (same stdout under honcho/foreman/Heroku) could land in between.
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


@job
def sample_work(seconds=10, cleanup=2):
    """Sleep ``seconds`` and print ``complete job!``; on TermException sleep ``cleanup`` and print
    ``graceful shutdown!``."""
    try:
        time.sleep(seconds)
        _say("complete job!")
    except TermException:
        _say("caught TermException, cleaning up")
        time.sleep(cleanup)
        _say("graceful shutdown!")


@job
async def sample_async_work(seconds=10, cleanup=2):
    """Await ``seconds`` and print ``complete job!``; on TermException (raised at the await) await ``cleanup`` and
    print ``graceful shutdown!``."""
    import asyncio
    try:
        await asyncio.sleep(seconds)
        _say("complete job!")
    except TermException:
        _say("caught TermException, cleaning up")
        await asyncio.sleep(cleanup)
        _say("graceful shutdown!")


@job
def resumable_work(items=200, seconds_per_item=0.05):
    """Process items ``0 .. items-1`` (sleeping ``seconds_per_item`` each), checkpointing after every item; resumes
    from the last checkpoint after a restart."""
    done = last_checkpoint(0)
    if done:
        _say(f"resuming at item {done} of {items}")
    try:
        for i in range(done, items):
            time.sleep(seconds_per_item)  # the work on item i
            checkpoint(i + 1)             # item i is done: the next run starts after it
            done = i + 1
        _say(f"all {items} items done")
    except TermException:
        _say(f"stopping with {done} of {items} items done; the next run resumes there")
        raise                             # put back, with its checkpoint


@job
def noop():
    """Does nothing: for benchmarks and smoke tests."""
