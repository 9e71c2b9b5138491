"""The sample job: the Python twin of Resque's classic TERM_CHILD example.

It works for ``seconds``; if the worker is told to stop meanwhile, :class:`TermException` arrives inside it, and it
spends ``cleanup`` seconds cleaning up before returning normally (so the job counts as done).
"""
import time

from . import TermException, job


@job
def sample_work(seconds=10, cleanup=2):
    """Sleep ``seconds`` and print ``complete job!``; on TermException sleep ``cleanup`` and print
    ``graceful shutdown!``."""
    try:
        time.sleep(seconds)
        print("complete job!", flush=True)
    except TermException:
        print("caught TermException, cleaning up", flush=True)
        time.sleep(cleanup)
        print("graceful shutdown!", flush=True)


@job
def noop():
    """Does nothing: for benchmarks and smoke tests."""
