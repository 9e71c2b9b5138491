"""Resumable test jobs (JOB_MODULES=worker.sample,tests.jobs,tests.jobs_checkpoint): they record each item they
process to a Redis list, so a test can check that no item was skipped and count the ones done twice."""
import sys
import threading
import time

from tests.jobs import nested_list, event, r
from worker import TermException, checkpoint, job, last_checkpoint


@job
def ck_items(key, n=200, delay=0.05, stubborn=False):
    """Items ``last_checkpoint(0) .. n-1``: sleep, record the item, checkpoint past it. ``stubborn`` swallows
    TermException and carries on (killed at the TERM deadline)."""
    start = last_checkpoint(0)
    event(key + ":runs", "started", at=start)
    i = start
    while i < n:
        try:
            time.sleep(delay)
            r().rpush(key, i)
            checkpoint(i + 1)
            i += 1
        except TermException:
            if not stubborn:
                raise


@job
def ck_then_hang(key, count=1):
    """``checkpoint(0 .. count-1)`` as fast as it can, say so, then wait to be stopped (ignoring TermException)."""
    for i in range(count):
        checkpoint(i)
    ready = False
    while True:  # stubborn from here on, the readiness event included: a stop can never end it early
        try:
            if not ready:
                ready = True
                event(key, "ready", resumed_from=last_checkpoint())
            time.sleep(60)
        except TermException:
            pass


@job(max_interruptions=2)
def ck_limited(key):
    """Checkpoints, says so, and waits for TermException (propagated: put back, or failed past the limit)."""
    checkpoint({"cursor": (last_checkpoint({"cursor": 0})["cursor"] + 1)})
    event(key, "ready")
    time.sleep(60)


@job
def ck_then_fail(key):
    checkpoint({"at": 7})
    event(key, "ready")
    r().blpop(key + ":go", 30)  # the test looks at the saved checkpoint, then lets it fail
    raise RuntimeError("gave up")


@job
def ck_big(key, size, pad=""):
    """Checkpoints ``size`` characters once (a large checkpoint, within the limit), says so with what it resumed
    from, then waits for TermException (put back with the checkpoint)."""
    got = last_checkpoint()
    if got is None:
        checkpoint("x" * size)
    event(key, "ready", resumed=len(got) if got is not None else None, pad=len(pad))
    time.sleep(60)


@job
def ck_surrogate(key):
    """Tries to checkpoint text with a lone surrogate (an undecodable file name) and says what happened."""
    try:
        checkpoint({"path": "caf\udce9.txt"})
    except ValueError as exc:
        event(key, "refused", message=str(exc))
    else:
        event(key, "accepted")


# --- checkpoints the worker cannot decode, or from several threads (tests/test_checkpoint.py) ---

@job
def ck_deep_checkpoint(key, depth=5000):
    """Checkpoints a list nested ``depth`` deep, then waits for an item on ``key:go`` and returns."""
    sys.setrecursionlimit(20000)
    checkpoint(nested_list(depth))
    event(key, "checkpointed")
    r().blpop(key + ":go", 30)
    event(key, "finished")


@job
def ck_threaded_checkpoints(key, size=60_000, rounds=20):
    """Three threads call checkpoint() at once, each ``rounds`` times with a ``size``-character value."""
    start = threading.Barrier(3)
    errors = []

    def body(n):
        start.wait()
        try:
            for i in range(rounds):
                checkpoint({"t": n, "i": i, "pad": chr(ord("a") + n) * size})
        except BaseException as exc:  # noqa: B902
            errors.append(repr(exc))

    threads = [threading.Thread(target=body, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    event(key, "finished", errors=errors)
    return "ok"


@job(retries=1)
def ck_fail_once(key):
    """First run: checkpoint 7, then raise. The retry records what it resumed from (docs/user-guide.md: a retry
    after an exception resumes from the last checkpoint)."""
    seen = last_checkpoint()
    event(key, "run", resumed_from=seen)
    if seen is None:
        checkpoint(7)
        raise RuntimeError("first run fails after its checkpoint")
