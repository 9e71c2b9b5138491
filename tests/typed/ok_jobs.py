"""Checked by mypy in tests/test_job_api_typing.py: every line here must type-check."""
from datetime import datetime, timezone

from worker import get_group, group, job


@job
def add(x: int, y: int = 1) -> int:
    return x + y


@job(queue="mail", retries=3)
def send_welcome(user_id: int, *, subject: str = "Welcome") -> None:
    pass


total: int = add(1, y=2)                       # still a plain call, with its own return type
job_id: str = add.enqueue(1, y=2)
later: str = send_welcome.enqueue_in(30, 7, subject="Hi")
at: str = send_welcome.enqueue_at(datetime(2030, 1, 1, tzinfo=timezone.utc), 7)
name: str = add.job_name
# per-call options (issue 24 item 3): typed like the function
custom: str = send_welcome.options(queue="other", timeout=60, retries=5, job_id="welcome-42").enqueue(7)
soon: str = add.options(delay=30).enqueue(1, y=2)
later2: str = add.options(result_ttl=0).enqueue_in(30, 1)


async def produce() -> str:  # per-call options on the async producer
    return await send_welcome.options(job_id="welcome-43").enqueue_async(7)
# groups (issue 25 item 4): f.call(...) is typed like the function; the group returns its id
@job
def report(label: str, results: list[dict[str, object]] | None = None) -> None:  # a default: .call omits it
    pass


gid: str = group([add.call(1, y=2), send_welcome.options(queue="other").call(7)],
                 on_complete=report.call("batch")).enqueue()
progress = get_group(gid)
