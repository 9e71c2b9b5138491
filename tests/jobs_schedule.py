"""Periodic test jobs (JOB_MODULES=tests.jobs_schedule): nothing consumes their queues in the tests (QUEUES=default),
so each queue's length counts the enqueues exactly (every_second opts out of being unique per schedule, issue 25:
its ticks pile up in that queue on purpose), whatever happens to the workers (a job run twice after a crash
would not change it), and each entry's ``tick`` says which tick it was."""
from worker import job


@job(every=1, queue="sched", schedule_args=["tick"], schedule_kwargs={"n": 1}, unique=False)  # each tick
def every_second(label, n=0):
    pass


@job(every=3600, queue="hourly")
def hourly():
    pass


@job(every=3600, queue="strict", misfire_grace=1)
def hourly_strict():
    pass


@job(cron="* * * * *", queue="cron")
def minutely():
    pass
