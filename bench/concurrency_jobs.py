"""Jobs for bench/concurrency.py: registered for this worker (``JOB_MODULES=concurrency_jobs``) and, as plain
functions, for RQ (which imports jobs by dotted path, ``concurrency_jobs.rq_sleep_ms``; bench/ is on its path)."""
import time

from worker import job


@job
def noop():
    """Does nothing: the runtime's own cost per job."""


@job
def sleep_ms(ms=50):
    """Waits ``ms`` milliseconds without using a core (an I/O-bound job: HTTP call, e-mail, database)."""
    time.sleep(ms / 1000.0)


@job
def spin_ms(ms=10):
    """Burns ``ms`` milliseconds of CPU in the job child: the CPU-accounting check (every process counted?)."""
    end = time.thread_time() + ms / 1000.0
    while time.thread_time() < end:
        pass


def rq_noop():
    """RQ's twin of :func:`noop`."""


def rq_sleep_ms(ms=50):
    """RQ's twin of :func:`sleep_ms`."""
    time.sleep(ms / 1000.0)
