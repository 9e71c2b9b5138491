"""Job registry (``@job``) and the enqueue API.

Only names registered with :func:`job` in ``JOB_MODULES`` are run: a payload (``payload.py``: its format, building
and parsing, re-exported here) cannot name arbitrary code.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import fields
from datetime import datetime, timedelta
from typing import Any, Callable, Optional, Union

from . import schedule
from .config import MAX_TTL, ConfigError
from .payload import DEFAULT_QUEUE, BadJob, build_payload, json_dumps, loose_id, parse, queue_of  # noqa: F401
from .calloptions import JobCall, PendingJob
from .payload import REGISTRY as _REGISTRY, delay_of, due_of, unique_keys
from .jobspec import JobOptions, JobSpec, arity_checker, exception_classes, limits  # noqa: F401 (re-exported)


# --- the types type checkers see for @job (runtime: the plain decorator below; see jobtypes.py) ---
from typing import overload  # noqa: E402

from .jobtypes import JobFunction, P, R  # noqa: E402


@overload
def job(fn: Callable[P, R], /) -> JobFunction[P, R]: ...


@overload
def job(fn: None = None, /, *, queue: str = DEFAULT_QUEUE, name: Optional[str] = None,
        timeout: Optional[float] = None, retries: Optional[int] = None, max_interruptions: Optional[int] = None,
        result_ttl: Optional[float] = None, unique: Union[bool, tuple, None] = None, unique_until: str = "end",
        every: Optional[float] = None, cron: Optional[str] = None, tz: Optional[str] = None,
        misfire_grace: Optional[float] = None, schedule_args: Optional[list] = None,
        schedule_kwargs: Optional[dict] = None, dont_retry: Optional[tuple] = None,
        retry_on: Optional[tuple] = None, strict_result: bool = False, concurrency: Optional[int] = None,
        rate: Optional[str] = None) -> Callable[[Callable[P, R]], JobFunction[P, R]]: ...


def job(fn=None, *, queue: str = DEFAULT_QUEUE, name: Optional[str] = None, timeout: Optional[float] = None,
        retries: Optional[int] = None, max_interruptions: Optional[int] = None, result_ttl: Optional[float] = None,
        every: Optional[float] = None, cron: Optional[str] = None, tz: Optional[str] = None,
        misfire_grace: Optional[float] = None, schedule_args=None, schedule_kwargs=None, dont_retry=None,
        retry_on=None, strict_result: bool = False, unique: Union[bool, tuple, None] = None, unique_until: str = "end",
        concurrency: Optional[int] = None, rate: Optional[str] = None):
    """Register a function as a job, by its ``__name__`` unless ``name`` is given.

    Usable bare (``@job``) or with options (``@job(queue="mail", timeout=60, retries=3)``). The function keeps working
    as a plain call and gains ``.enqueue(*args, **kwargs)``, ``.enqueue_in(seconds, ...)`` and
    ``.enqueue_at(datetime, ...)``, which return the job id, and ``.options(...)`` (per-call options: :func:`options`). ``timeout`` (seconds, enforced by the parent) and
    ``retries`` (failed attempts retried with exponential backoff) default to ``JOB_TIMEOUT`` and ``JOB_RETRIES``.
    ``max_interruptions`` (put-backs after a stop before the job counts as failed; 0 = no limit) defaults to
    ``MAX_INTERRUPTIONS``; ``result_ttl`` (seconds its return value and status stay readable with ``get_job``
    once it is done; 0 = none) defaults to ``RESULT_TTL``.

    Periodic: ``every=`` seconds or ``cron=`` (5 fields, UTC unless ``tz=``), called with ``schedule_args`` and
    ``schedule_kwargs``; ``misfire_grace`` (seconds, default one interval): see ``worker/schedule.py``.

    ``dont_retry=(ValueError, ...)``: a run that raises one of these (or a subclass) fails at once, whatever
    ``retries``; ``retry_on=(IOError, ...)``: only these are retried. Not both (``TypeError``). They concern
    exceptions the job raises; a timeout, crash or memory kill is retried as before.

    A return value that is not JSON (a set, a datetime, an object) leaves the job done, its result replaced by
    ``{"unserializable": "<type>", "repr": "<repr, 200 chars>"}`` and a warning; ``strict_result=True`` fails it.
    ``unique=True`` or ``=("user_id",)``: one job per key at a time (payload.unique_id, docs/user-guide.md);
    ``unique_until="start"`` frees the key when the job starts instead of when it ends. A periodic job is unique per
    schedule (a tick is skipped while the previous tick's run has not ended) unless ``unique=False``.
    ``concurrency=N``: at most N runs of this job at once across every worker; ``rate="10/s"`` (``/m``, ``/h``):
    a token bucket of 10 shared by every worker (docs/user-guide.md, "Concurrency and rate limits").
    """
    sched = schedule.declare(every, cron, tz, misfire_grace, schedule_args, schedule_kwargs, unique is not False)
    if unique_until not in ("end", "start"):
        raise ValueError(f"@job(unique_until=...) must be 'end' or 'start', not {unique_until!r}")
    if unique_until == "start" and unique in (None, False):
        raise TypeError("@job(unique_until='start') needs unique=True or unique=(names...)")
    no_retry, only_retry = exception_classes("dont_retry", dont_retry), exception_classes("retry_on", retry_on)
    if no_retry is not None and only_retry is not None:
        raise TypeError("@job: give dont_retry or retry_on, not both")
    if not isinstance(strict_result, bool):
        raise TypeError(f"@job(strict_result=...) must be True or False, not {strict_result!r}")
    most, per = limits(concurrency, rate)

    def register(f):
        job_name = name or f.__name__
        existing = _REGISTRY.get(job_name)
        if existing is not None and existing.fn is not f and (
                existing.fn.__module__, existing.fn.__qualname__) != (f.__module__, f.__qualname__):
            raise ValueError(f"job name {job_name!r} is already registered by "
                             f"{existing.fn.__module__}.{existing.fn.__qualname__}")
        if timeout is not None and timeout < 0:
            raise ValueError("job timeout must be >= 0 seconds")
        if retries is not None and retries < 0:
            raise ValueError("job retries must be >= 0")
        if max_interruptions is not None and max_interruptions < 0:
            raise ValueError("job max_interruptions must be >= 0")
        if result_ttl is not None and not 0 <= result_ttl <= MAX_TTL:
            raise ValueError(f"job result_ttl must be >= 0 and <= {MAX_TTL:g} seconds")
        sig = inspect.signature(f)
        _REGISTRY[job_name] = JobSpec(job_name, f, queue, timeout, retries, sig, max_interruptions, result_ttl, sched,
                                      arity_checker(f), no_retry or (), only_retry, strict_result,
                                      inspect.iscoroutinefunction(f), unique_keys(unique, sig), unique_until,
                                      most, per)
        f.job_name = job_name
        f.enqueue = lambda *a, **kw: enqueue(job_name, *a, **kw)
        # positional-only: a job's own parameters may be called name, seconds or when
        f.enqueue_in = lambda seconds, /, *a, **kw: enqueue_in(seconds, job_name, *a, **kw)
        f.enqueue_at = lambda when, /, *a, **kw: enqueue_at(when, job_name, *a, **kw)
        f.options = lambda **opts: options(job_name, **opts)
        f.call = lambda *a, **kw: call(job_name, *a, **kw)  # a group's member or callback (worker.group)
        f.enqueue_async = lambda *a, **kw: enqueue_async(job_name, *a, **kw)
        f.enqueue_in_async = lambda seconds, /, *a, **kw: enqueue_in_async(seconds, job_name, *a, **kw)
        f.enqueue_at_async = lambda when, /, *a, **kw: enqueue_at_async(when, job_name, *a, **kw)
        return f
    return register(fn) if fn is not None else register


def registered(name: str) -> Optional[JobSpec]:
    return _REGISTRY.get(name)


def registry() -> dict:
    return dict(_REGISTRY)


#: job name -> the ``JOB_MODULES`` entry whose import registered it (worker.start reports both; see startup.py)
ORIGIN: dict = {}


def import_modules(modules) -> None:
    """Import every ``JOB_MODULES`` entry (once, in the parent, before any fork). Raises :class:`ConfigError`:
    one line for a module that does not exist; for an error inside the app's code, the traceback's last frames
    (file and line) first and the one-line summary last (``frameworks.import_failure``)."""
    from . import frameworks
    for mod in modules:
        before = set(_REGISTRY)
        try:
            importlib.import_module(mod)
        except Exception as exc:  # the user's module may fail in any way; report it as config
            frames, summary = frameworks.import_failure(mod, exc)
            raise ConfigError("\n".join(frames + [f"JOB_MODULES={','.join(modules)!r} is not valid: {summary}"])) \
                from None
        for name in set(_REGISTRY) - before:
            ORIGIN.setdefault(name, mod)


def meta() -> dict:
    """What the worker needs of each registered job, as JSON (the fork server sends it; the worker imports no app)."""
    return {name: {"queue": s.queue, **{f.name: getattr(s, f.name, None) for f in fields(JobOptions)},
                   "schedule": schedule.check(s), "module": ORIGIN.get(name), "concurrency": s.concurrency,
                   "rate": s.rate,
                   "defined_in": getattr(s.fn, "__module__", None)}
            for name, s in _REGISTRY.items()}


# --- enqueue API (module-level default connection, configured from the environment on first use) ---

_default = None


def default_broker():
    """The broker of the module-level enqueue API (``worker.enqueue``, ``get_job``, ``queue_depth``): the one set with
    :func:`use`, else one connected from the environment on first use."""
    global _default
    if _default is None:
        from . import config as _config
        from .fetch import Broker
        from .client import connect
        cfg = _config.load(export=False)  # a web process's os.environ is not ours to change (issue 21 item 8)
        _default = Broker(connect(cfg, name="enqueue"), cfg)
    return _default


def current_broker():
    """The broker :func:`use` set (or :func:`default_broker` connected), None before either: what to restore."""
    return _default


def use(broker) -> None:
    """Set the broker used by the module-level enqueue functions (the CLI and tests do this)."""
    global _default
    _default = broker


def _send(method: str, *args, **kwargs):
    """Call the broker; a refused connection says which Redis it tried and where that address came from."""
    b = default_broker()
    try:
        return getattr(b, method)(*args, **kwargs)
    except Exception as exc:
        import redis
        if not isinstance(exc, redis.ConnectionError):
            raise
        from .config import redact_url
        url = redact_url(b.cfg.redis_url)
        raise redis.ConnectionError(f"cannot enqueue: Redis at {url} (from REDIS_URL, or the default "
                                    f"redis://localhost:6379/0 when REDIS_URL is unset) is unreachable: {exc}") from exc


def _check_name(name, queue=None):
    """A non-empty name, and a known destination: ``queue`` given, or the name registered in this process (its
    ``@job(queue=)``). Otherwise the job would silently go to ``default``, or to no worker that knows it."""
    if not isinstance(name, str) or not name:
        raise TypeError("job name must be a non-empty string")
    if queue is None and name not in _REGISTRY:
        raise ValueError(f"job {name!r} is not registered in this process, so its queue is unknown: import the "
                         f"module that defines it (e.g. `import myapp.jobs`, the module named in JOB_MODULES) or "
                         f"pass queue=\"...\" explicitly")


def _check_args(name, args, kwargs) -> None:
    """Arguments that do not fit a job registered in this process raise ``TypeError`` at the call, as Celery's
    ``.delay`` does, rather than fail on the worker (issue 21 item 7). Unregistered names are not checked."""
    spec = _REGISTRY.get(name)
    if spec is not None:
        try:
            spec.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"arguments do not fit {name}{spec.signature}: {exc}") from None


def enqueue(name: str, /, *args: Any, queue: Optional[str] = None, **kwargs: Any) -> str:
    """Put job ``name`` on its queue (or ``queue``) with JSON arguments; returns the job id.

    A name that is not registered in this process (its module not imported) needs ``queue``: ``ValueError``
    otherwise. Arguments that do not fit a registered job's signature raise ``TypeError`` here.

    ``queue`` is reserved for the runtime; pass a job argument named ``queue`` through ``enqueue_many``. Every
    other keyword (``name``, ``seconds``, ``when`` included) goes to the job.
    """
    _check_name(name, queue)
    _check_args(name, args, kwargs)
    return _send("push", name, args, kwargs, queue=queue)


def enqueue_in(seconds: Union[float, timedelta], name: str, /, *args: Any, queue: Optional[str] = None,
               **kwargs: Any) -> str:
    """Schedule job ``name`` to be queued ``seconds`` (a number or a ``timedelta``) from now (on the Redis clock,
    the one that moves scheduled jobs; 0 or less: now); returns the job id."""
    seconds = delay_of(seconds)
    _check_name(name, queue)
    _check_args(name, args, kwargs)
    return _send("push", name, args, kwargs, queue=queue, delay=seconds)


def enqueue_at(when: datetime, name: str, /, *args: Any, queue: Optional[str] = None, **kwargs: Any) -> str:
    """Schedule job ``name`` to be queued at ``when``, a ``datetime`` (naive ones are taken as UTC); returns the
    job id. Anything else (a unix time, a ``date``, None) raises ``TypeError``: use ``enqueue_in`` for a delay."""
    due = due_of(when)
    _check_name(name, queue)
    _check_args(name, args, kwargs)
    return _send("push", name, args, kwargs, queue=queue, due=due)


def _push(name: str, args, kwargs, check_only: bool = False, **how):
    """What a :class:`~worker.calloptions.JobCall` enqueues through: the enqueue API's checks and connection
    (``check_only``: the checks alone, for ``.call``)."""
    _check_name(name, how.get("queue"))
    _check_args(name, args, kwargs)
    return None if check_only else _send("push", name, args, kwargs, **how)


def call(name: str, /, *args: Any, **kwargs: Any) -> PendingJob:
    """``f.call(...)``: a checked, not-yet-enqueued call of job ``name`` for ``worker.group`` (issue 25 item 4)."""
    _check_name(name)
    _check_args(name, args, kwargs)
    return PendingJob(name, args, kwargs)


def options(name: str, /, **opts) -> JobCall:
    """``f.options(...)`` by job name: a :class:`~worker.calloptions.JobCall` (options checked here)."""
    return JobCall(name, _push, _push_async, **opts)


def _calls(calls) -> list:
    """``enqueue_many``'s elements as ``(args, kwargs)`` pairs. Each element is one call:

    - a 2-tuple ``(args, kwargs)`` whose first item is a list or tuple and second a dict: ``job(*args, **kwargs)``;
    - any other list or tuple: the positional arguments, ``job(*element)``.

    Anything else (a dict, a string, a number, None) is refused with ``TypeError``: a dict would otherwise become
    its keys as positional arguments. To pass exactly ``[list, dict]`` positionally, write ``((lst, dct), {})``.
    """
    if isinstance(calls, (str, bytes, dict)):
        raise TypeError(f"enqueue_many: calls must be an iterable of calls, not a {type(calls).__name__}")
    out = []
    for i, call in enumerate(calls):
        if isinstance(call, tuple) and len(call) == 2 and isinstance(call[0], (list, tuple)) \
                and isinstance(call[1], dict):
            out.append((tuple(call[0]), call[1]))
        elif isinstance(call, (list, tuple)):
            out.append((tuple(call), {}))
        else:
            hint = f" (for keyword arguments write ((), {call!r}))" if isinstance(call, dict) else ""
            raise TypeError(f"enqueue_many: call {i} is a {type(call).__name__}: expected a list or tuple of "
                            f"positional arguments, or an (args, kwargs) pair{hint}")
    return out


def enqueue_many(name: str, calls, queue: Optional[str] = None) -> list:
    """Enqueue many calls of one job in a few round trips; returns the job ids in order. Each element of
    ``calls`` is an ``(args, kwargs)`` pair (a list or tuple, then a dict) or a list/tuple of positional arguments;
    anything else raises ``TypeError`` and nothing is enqueued."""
    _check_name(name, queue)
    pairs = _calls(calls)
    for args, kwargs in pairs:
        _check_args(name, args, kwargs)
    return _send("push_many", name, pairs, queue=queue)


# --- the same for async code (FastAPI, Starlette): redis-py's asyncio client (worker/aio_broker.py) ---

async def _push_async(name: str, args, kwargs, queue: Optional[str], **how) -> str:
    """``how``: delay/due, and a JobCall's job_id/options (``f.options(...).enqueue_async``)."""
    _check_name(name, queue)
    _check_args(name, args, kwargs)
    if getattr(_default, "inline", False):  # testing.inline(): the job runs now, as the sync enqueue runs it
        return _default.push(name, args, kwargs, queue=queue, **how)
    from . import aio_broker
    return await aio_broker.default().push(name, args, kwargs, queue=queue, **how)


async def enqueue_async(name: str, /, *args: Any, queue: Optional[str] = None, **kwargs: Any) -> str:
    """:func:`enqueue` for async code (``await``): the same checks, payload and script, on redis-py's asyncio
    client (connected from ``REDIS_URL`` on first use, one per event loop)."""
    return await _push_async(name, args, kwargs, queue)


async def enqueue_in_async(seconds: Union[float, timedelta], name: str, /, *args: Any, queue: Optional[str] = None,
                           **kwargs: Any) -> str:
    """:func:`enqueue_in` for async code."""
    return await _push_async(name, args, kwargs, queue, delay=delay_of(seconds))


async def enqueue_at_async(when: datetime, name: str, /, *args: Any, queue: Optional[str] = None,
                           **kwargs: Any) -> str:
    """:func:`enqueue_at` for async code."""
    return await _push_async(name, args, kwargs, queue, due=due_of(when))
