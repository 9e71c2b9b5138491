"""What a registered job is: :class:`JobSpec` (the function and its ``@job`` settings), :class:`JobOptions` (every
per-job option of a claimed job, resolved once) and the checks ``@job`` runs at decoration. ``jobs.py`` holds the
decorator and the registry; this module holds what they store, so that a new per-job option is declared here
(docs/design.md, "Adding a per-job option")."""
from __future__ import annotations

import inspect
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
