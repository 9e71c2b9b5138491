"""Jobs for tests/test_review_defects.py (JOB_MODULES=worker.sample,tests.jobs,tests.jobs_review).

Events go to Redis lists (tests.jobs.event). ``REVIEW_REDIS_URL``, when set, is where they go instead of REDIS_URL
(a test that puts a proxy between the worker and Redis still hears from the job directly)."""
import os
import struct
import sys
import threading
import time

import redis

from worker import TermException, checkpoint, job

_conn = {}


def r():
    pid = os.getpid()
    if pid not in _conn:
        _conn.clear()
        url = os.environ.get("REVIEW_REDIS_URL") or os.environ["REDIS_URL"]
        _conn[pid] = redis.Redis.from_url(url, decode_responses=True)
    return _conn[pid]


def event(key, kind, **fields):
    import json
    r().rpush(key, json.dumps({"event": kind, "t": time.time(), "pid": os.getpid(), **fields}))


def _deep(n):
    value = []
    for _ in range(n - 1):
        value = [value]
    return value


@job
def rv_deep_return(key, depth=5000):
    """Returns a list nested ``depth`` deep (JSON the job itself can encode with its raised recursion limit)."""
    sys.setrecursionlimit(20000)
    event(key, "started")
    return _deep(depth)


@job
def rv_deep_checkpoint(key, depth=5000):
    """Checkpoints a list nested ``depth`` deep, then waits for an item on ``key:go`` and returns."""
    sys.setrecursionlimit(20000)
    checkpoint(_deep(depth))
    event(key, "checkpointed")
    r().blpop(key + ":go", 30)
    event(key, "finished")


@job
def rv_forged_report(key, body='{"status":"error","type":5}'):
    """Writes a report frame of its own making to the report pipe and leaves."""
    from worker import child
    event(key, "started")
    data = body.encode()
    os.write(child._state.report_fd, struct.pack(">cI", b"R", len(data)) + data)
    os._exit(0)


@job
def rv_sleep(key, seconds=1.0):
    event(key, "started")
    time.sleep(seconds)
    event(key, "ended")
    return "slept"


@job
def rv_blob(key, blob):
    event(key, "ran", n=len(blob))


@job
def rv_threaded_checkpoints(key, size=60_000, rounds=20):
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


@job
def rv_popen_return(key):
    """Starts ``sleep 77`` and returns at once, leaving it running."""
    import subprocess
    p = subprocess.Popen(["sleep", "77"])
    r().rpush(key, str(p.pid))


@job
def rv_term_probe(key, seconds=60, blob=""):
    """Records ``started``, then sleeps; on TermException records ``term`` (with its time) and returns."""
    try:  # "started" inside the try: a stop that lands while its reply is read is still seen
        event(key, "started")
        end = time.time() + seconds
        while time.time() < end:
            time.sleep(0.02)
        event(key, "completed")
    except TermException:
        event(key, "term")


# --- the end of a run (review of "a job ends with its report") ---

@job
def rv_forks_a_helper(key, seconds=1.0, how="exit"):
    """Forks a helper process that leaves through the runtime (``sys.exit(0)``, or returning from the job function),
    then works on for ``seconds`` and returns "parent": the helper must not end the job with a report of its own."""
    event(key, "start")
    if os.fork() == 0:
        if how == "exit":
            sys.exit(0)
        return "helper"
    time.sleep(seconds)
    event(key, "end")
    return "parent"


@job
def rv_leaves_sleep_and_stalls_server(key):
    """Leaves ``sleep 300`` in its process group, stops its fork server (a stall), and returns ok."""
    import signal
    import subprocess
    p = subprocess.Popen(["sleep", "300"])
    event(key, "started", child=p.pid, server=os.getppid())
    os.kill(os.getppid(), signal.SIGSTOP)


@job
def rv_interrupted_stalls_server(key, cleanup=0.45, leave=False):
    """On TermException: cleans up ``cleanup`` s, optionally leaving ``sleep 300`` behind, stops its fork server and
    re-raises (an interrupted run whose exit the stalled server cannot report)."""
    import signal
    import subprocess
    event(key, "started", server=os.getppid())
    p = subprocess.Popen(["sleep", "300"]) if leave else None
    try:
        time.sleep(60)
    except TermException:
        time.sleep(cleanup)
        os.kill(os.getppid(), signal.SIGSTOP)
        event(key, "reraise", child=p.pid if p else 0)
        raise


@job
def rv_hanging_flush(key):
    """Does its work, then leaves a stdout whose flush never returns (a stalled log pipe behind a custom stream)."""
    class Stuck:
        def write(self, data):
            return len(data)

        def flush(self):
            time.sleep(3600)

    event(key, "work-done")
    sys.stdout = Stuck()
