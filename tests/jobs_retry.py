"""Jobs for tests/test_retries.py's dont_retry/retry_on tests (issue 24 item 6). Each run records itself on ``key``
and raises the exception ``kind`` names."""
from tests.jobs import event
from worker import job

RAISES = {"value": UnicodeError, "io": ConnectionError, "key": KeyError}  # ValueError's and OSError's subclasses


@job(retries=1, dont_retry=(ValueError,))
def rt_dont(key, kind):
    event(key, "run", raised=kind)
    raise RAISES[kind](kind)


@job(retries=1, retry_on=(IOError,))
def rt_only(key, kind):
    event(key, "run", raised=kind)
    raise RAISES[kind](kind)
