"""The sample job: the Python twin of Resque's classic TERM_CHILD example.

It works for ``seconds``; if the worker is told to stop meanwhile, :class:`TermException` arrives inside it, and it
spends ``cleanup`` seconds cleaning up before returning normally (so the job counts as done).
"""
import sys
import time

from . import TermException, job


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
def noop():
    """Does nothing: for benchmarks and smoke tests."""
