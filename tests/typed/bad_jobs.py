"""Checked by mypy in tests/test_job_api_typing.py: each line marked `# E` must be reported, and only those."""
from worker import job


@job
def add(x: int, y: int = 1) -> int:
    return x + y


@job(queue="mail")
def send_welcome(user_id: int) -> None:
    pass


add.enqueue("one")                      # E: str for int
send_welcome.enqueue(7, 8)              # E: too many arguments
send_welcome.enqueue_in("soon", 7)      # E: seconds is a number
s: str = add(1)                         # E: the plain call returns int
send_welcome.enqueue(user=7)            # E: no such parameter
send_welcome.options(queue="x").enqueue("seven")   # E: str for int (per-call options keep the signature)
send_welcome.options(retries="5")                  # E: retries is an int
send_welcome.options(colour="red")                 # E: no such option
send_welcome.options(queue="x").enqueue_async("seven")   # E: str for int (async per-call options too)
add.call("one")                                    # E: str for int (a group's member is checked like enqueue)
