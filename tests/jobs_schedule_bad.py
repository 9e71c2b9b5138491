"""A schedule the worker must refuse at start (exit 2, one line): minute 61 does not exist."""
from worker import job


@job(cron="61 * * * *", queue="sched")
def never():
    pass
