"""Static types of the ``@job`` API (for type checkers; nothing here runs on the hot path).

``@job`` returns the decorated function itself, with its enqueue methods added (and their ``_async`` twins). :class:`JobFunction` describes that
object so a type checker (mypy, pyright) keeps the function's own signature for plain calls and checks the
arguments of ``.enqueue``/``.enqueue_in``/``.enqueue_at`` against it::

    @job(queue="mail")
    def send_welcome(user_id: int) -> None: ...

    send_welcome.enqueue(7)          # ok: returns the job id (str)
    send_welcome.enqueue("seven")    # error: "str" is not "int"

To send a job to another queue than its own (or with another timeout, retries, a delay, an id of your own), use
``send_welcome.options(queue="other").enqueue(7)``: the options never mix with the function's own keyword arguments.
``send_welcome.call(7)`` is a call not yet enqueued, checked the same way (:class:`Pending`, for ``worker.group``).
"""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import ParamSpec, Protocol, TypeVar

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class Pending(Protocol):
    """What ``f.call(...)`` returns: a call checked against the function's signature, not yet enqueued (a member or
    the callback of ``worker.group``)."""

    name: str


class JobCall(Protocol[P]):
    """What ``f.options(...)`` returns: the enqueue methods, typed like the function, with the call's options."""

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> str: ...

    def enqueue_in(self, seconds: float | timedelta, /, *args: P.args, **kwargs: P.kwargs) -> str: ...

    def enqueue_at(self, when: datetime, /, *args: P.args, **kwargs: P.kwargs) -> str: ...

    async def enqueue_async(self, *args: P.args, **kwargs: P.kwargs) -> str: ...

    async def enqueue_in_async(self, seconds: float | timedelta, /, *args: P.args, **kwargs: P.kwargs) -> str: ...

    async def enqueue_at_async(self, when: datetime, /, *args: P.args, **kwargs: P.kwargs) -> str: ...
    def call(self, *args: P.args, **kwargs: P.kwargs) -> Pending: ...


class JobFunction(Protocol[P, R_co]):
    """A function registered with ``@job``: callable as before, plus the enqueue methods (each returns the job id)."""

    job_name: str

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> str: ...

    def enqueue_in(self, seconds: float | timedelta, /, *args: P.args, **kwargs: P.kwargs) -> str: ...

    def enqueue_at(self, when: datetime, /, *args: P.args, **kwargs: P.kwargs) -> str: ...

    def call(self, *args: P.args, **kwargs: P.kwargs) -> Pending: ...

    async def enqueue_async(self, *args: P.args, **kwargs: P.kwargs) -> str: ...

    async def enqueue_in_async(self, seconds: float | timedelta, /, *args: P.args, **kwargs: P.kwargs) -> str: ...

    async def enqueue_at_async(self, when: datetime, /, *args: P.args, **kwargs: P.kwargs) -> str: ...

    def options(self, *, queue: str | None = None, delay: float | timedelta | None = None,
                timeout: float | None = None, retries: int | None = None, job_id: str | None = None,
                result_ttl: float | None = None, max_interruptions: int | None = None) -> JobCall[P]: ...


__all__ = ["JobCall", "JobFunction", "P", "Pending", "R"]
