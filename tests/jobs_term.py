"""Extra jobs for the SIGTERM-contract tests (JOB_MODULES=...,tests.jobs,tests.jobs_term).

Names start with ``tt_`` because job names are global. Events go to Redis lists through tests.jobs.event, whose
``t`` field is the job's time.time() at the moment of the event.
"""
import os
import time

from tests.jobs import event
from worker import TermException, job, shutdown_requested


@job
def tt_reraise(key, seconds=60, cleanup=0.0):
    """Records the TermException, cleans up ``cleanup`` s, then lets it propagate: the job must be put back."""
    event(key, "started")
    try:
        end = time.time() + seconds
        while time.time() < end:
            time.sleep(0.05)
        event(key, "completed")
    except TermException:
        event(key, "term", shutdown=shutdown_requested())
        end = time.time() + cleanup
        while time.time() < end:
            try:
                time.sleep(0.05)
            except BaseException as exc:  # noqa: B902 - a second exception would break the contract: record it
                event(key, "term_again", type=type(exc).__name__)
        raise


# A slow application import, on demand (tests/test_forkserver.py, fork-server restart with a slow import): when the
# file named by CC_SLOW_IMPORT_MARKER exists, importing this module takes CC_SLOW_IMPORT_SECONDS (default 6).
import os as _os  # noqa: E402

if _os.environ.get("CC_SLOW_IMPORT_MARKER") and _os.path.exists(_os.environ["CC_SLOW_IMPORT_MARKER"]):
    time.sleep(float(_os.environ.get("CC_SLOW_IMPORT_SECONDS", "6")))


# --- a stop that lands early, or under a stalled fork server (tests/test_shutdown.py,
# tests/test_forkserver.py, tests/test_outage.py) ---

@job
def tt_term_probe(key, seconds=60, blob=""):
    """Records ``started``, then sleeps; on TermException records ``term`` (with its time) and returns."""
    try:  # "started" inside the try: a stop that lands while its reply is read is still seen
        event(key, "started")
        end = time.time() + seconds
        while time.time() < end:
            time.sleep(0.02)
        event(key, "completed")
    except TermException:
        event(key, "term")


@job
def tt_interrupted_stalls_server(key, cleanup=0.45, leave=False):
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
