"""Jobs of the dashboard's browser test (tests/test_dashboard_browser.py)."""
from worker import job

from tests.jobs import event, r


@job(retries=0)
def fail_once(key):
    """Fails on its first run, succeeds on the next (the dashboard's Retry is what runs it again)."""
    if r().incr(key + ":runs") == 1:
        raise ValueError("first run fails <b>on purpose</b>")
    event(key, "done")
