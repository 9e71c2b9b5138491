"""What a registered job is: :class:`JobSpec` (the function and its ``@job`` settings), :class:`JobOptions` (every
per-job option of a claimed job, resolved once) and the checks ``@job`` runs at decoration. ``jobs.py`` holds the
decorator and the registry; this module holds what they store, so that a new per-job option is declared here
(docs/design.md, "Adding a per-job option")."""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field, fields
from typing import Callable, Optional

from .payload import valid_options


@dataclass(frozen=True)
class JobOptions:
    """Every per-job option of a claimed job, resolved once (``claimed.ClaimedJob``): the job's own ``@job`` value,
    else the :class:`~worker.config.Config` default its field names (``cfg``). Declared here, once: a field here and
    the ``@job`` parameter and :class:`JobSpec` field of the same name are the whole declaration (``meta()`` and
    the resolution go by these fields; docs/design.md, "Adding a per-job option"). A field whose ``@job``
    parameter does not exist yet (``max_attempts``) takes its Config default."""

    timeout: float = field(default=0.0, metadata={"cfg": "job_timeout"})
    retries: int = field(default=0, metadata={"cfg": "job_retries"})
    max_interruptions: int = field(default=0, metadata={"cfg": "max_interruptions"})
    result_ttl: float = field(default=500.0, metadata={"cfg": "result_ttl"})
    max_attempts: int = field(default=5, metadata={"cfg": "max_attempts"})  # lost attempts (no @job form yet)

    @classmethod
    def resolve(cls, declared: dict, cfg, per_call=None) -> "JobOptions":
        """``declared``: the job's ``meta()`` entry (None: not given in ``@job``); ``cfg``: the worker's Config;
        ``per_call``: the payload's "options" (``f.options(...)``), which win; one that is not valid is ignored."""
        given = valid_options(per_call)
        return cls(**{f.name: given[f.name] if f.name in given else declared[f.name]
                      if declared.get(f.name) is not None else getattr(cfg, f.metadata["cfg"]) for f in fields(cls)})


@dataclass(frozen=True)
class JobSpec:
    """A registered job: the function and its per-job settings (``None`` means: use the env default)."""

    name: str
    fn: Callable
    queue: str
    timeout: Optional[float]
    retries: Optional[int]
    signature: inspect.Signature
    max_interruptions: Optional[int] = None
    result_ttl: Optional[float] = None
    schedule: Optional[dict] = None  # every=/cron= and fixed arguments (worker/schedule.py), None if not periodic
    fits: Optional[Callable] = None  # raises TypeError if the arguments do not fit (see arity_checker)
    dont_retry: tuple = ()            # exception classes that fail the job at once (subclasses too)
    retry_on: Optional[tuple] = None  # if given, only these exception classes are retried
    strict_result: bool = False       # a return value that is not JSON fails the job (else: done, with a marker)
    is_async: bool = False            # ``async def``: the child runs it with asyncio.run (worker/aio.py)
    unique: Optional[tuple] = None    # @job(unique=): () every argument, else the names keyed on (payload.unique_id)
    unique_until: str = "end"         # "start": the key is freed when the job starts (payload.unique_id)
    concurrency: Optional[int] = None  # @job(concurrency=N): at most N runs at once, everywhere (cycle.lua)
    rate: Optional[tuple] = None      # @job(rate="10/s"): (count, period ms): a bucket of count tokens (cycle.lua)

    def retryable(self, exc: BaseException) -> bool:
        """Whether ``retries`` apply to a run that raised ``exc`` (``dont_retry`` / ``retry_on``). Decided in the job's
        process, where the app's exception classes live; the worker only sees the verdict in the report."""
        if self.dont_retry and isinstance(exc, self.dont_retry):
            return False
        return self.retry_on is None or isinstance(exc, self.retry_on)


def exception_classes(option: str, value) -> Optional[tuple]:
    """``@job(dont_retry=/retry_on=)`` as a tuple of exception classes (one class is taken as a tuple of one), None
    if not given; anything else raises ``TypeError`` at decoration, not at the first failure."""
    if value is None:
        return None
    if isinstance(value, type):
        value = (value,)
    if not isinstance(value, tuple) or not all(isinstance(c, type) and issubclass(c, BaseException) for c in value):
        raise TypeError(f"@job({option}=...) must be a tuple of exception classes, not {value!r}")
    if option == "retry_on" and not value:
        raise TypeError("@job(retry_on=()) would retry nothing: use retries=0")
    return value


def arity_checker(fn: Callable) -> Optional[Callable]:
    """A do-nothing function with ``fn``'s parameters (defaults and annotations dropped): calling it raises
    ``TypeError`` exactly when ``fn`` would refuse the arguments, through the interpreter's own argument parsing.
    The job child checks a payload's arguments with it before running the job: ``inspect.Signature.bind`` would
    touch dozens of the app's shared pages per job (each a copy-on-write fault). None if ``fn`` has no signature."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    params = [p.replace(annotation=p.empty, default=None if p.default is not p.empty else p.empty)
              for p in sig.parameters.values()]
    ns: dict = {}
    try:
        exec(f"def fits{sig.replace(parameters=params, return_annotation=sig.empty)}:\n    pass", ns)
    except SyntaxError:
        return None
    return ns["fits"]


_RATE = re.compile(r"\s*(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*\Z")
_PERIOD_MS = {"s": 1000, "sec": 1000, "second": 1000, "m": 60000, "min": 60000, "minute": 60000, "h": 3600000,
              "hour": 3600000}


def limits(concurrency, rate) -> tuple:
    """``@job(concurrency=, rate=)`` checked at decoration: ``(concurrency or None, (count, period_ms) or None)``.
    ``concurrency``: an int >= 1; ``rate``: ``"<count>/s"``, ``"/m"`` or ``"/h"`` with a count >= 1 (issue 25).
    Anything else raises ``TypeError`` (wrong type) or ``ValueError`` (wrong value)."""
    if concurrency is not None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int):
            raise TypeError(f"@job(concurrency=...) must be an int >= 1, not {concurrency!r}")
        if concurrency < 1:
            raise ValueError(f"@job(concurrency=...) must be >= 1 (at most that many runs at once), not {concurrency}")
    if rate is None:
        return concurrency, None
    if not isinstance(rate, str):
        raise TypeError(f"@job(rate=...) must be a string such as \"10/s\", \"100/m\" or \"1000/h\", not {rate!r}")
    m = _RATE.match(rate)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"@job(rate={rate!r}) is not valid: expected \"<count>/s\", \"<count>/m\" or \"<count>/h\" "
                         f"with a whole count >= 1, such as \"10/s\"")
    return concurrency, (int(m.group(1)), _PERIOD_MS[m.group(2)])
