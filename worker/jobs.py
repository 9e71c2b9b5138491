"""Job registry, JSON payloads and the enqueue API.

A payload is one JSON object, the only thing stored in a queue::

    {"id": "<32 hex>", "name": "<registered name>", "queue": "<q>", "args": [...], "kwargs": {...},
     "enqueued_at": <unix seconds>, "attempts": <failed or lost attempts so far>, "errors": [<history>]}

Only JSON is ever written or read (never pickle), and only names registered with :func:`job` in ``JOB_MODULES``
are run: a payload cannot name arbitrary code.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Optional

from . import schedule
from .config import QUEUE_RULE, ConfigError, valid_queue_name

DEFAULT_QUEUE = "default"


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


_REGISTRY: dict = {}


class BadJob(Exception):
    """A queue entry that cannot be run; the message is the reason recorded in the failed registry."""


# --- the types type checkers see for @job (runtime: the plain decorator below; see jobtypes.py) ---
from typing import overload  # noqa: E402

from .jobtypes import JobFunction, P, R  # noqa: E402


@overload
def job(fn: Callable[P, R], /) -> JobFunction[P, R]: ...


@overload
def job(fn: None = None, /, *, queue: str = DEFAULT_QUEUE, name: Optional[str] = None,
        timeout: Optional[float] = None, retries: Optional[int] = None,
        max_interruptions: Optional[int] = None, result_ttl: Optional[float] = None,
        every: Optional[float] = None, cron: Optional[str] = None, tz: Optional[str] = None,
        misfire_grace: Optional[float] = None, schedule_args: Optional[list] = None,
        schedule_kwargs: Optional[dict] = None) -> Callable[[Callable[P, R]], JobFunction[P, R]]: ...


def job(fn=None, *, queue: str = DEFAULT_QUEUE, name: Optional[str] = None, timeout: Optional[float] = None,
        retries: Optional[int] = None, max_interruptions: Optional[int] = None, result_ttl: Optional[float] = None,
        every: Optional[float] = None, cron: Optional[str] = None, tz: Optional[str] = None,
        misfire_grace: Optional[float] = None, schedule_args=None, schedule_kwargs=None):
    """Register a function as a job, by its ``__name__`` unless ``name`` is given.

    Usable bare (``@job``) or with options (``@job(queue="mail", timeout=60, retries=3)``). The function keeps working
    as a plain call and gains ``.enqueue(*args, **kwargs)``, ``.enqueue_in(seconds, ...)`` and
    ``.enqueue_at(datetime, ...)``, which return the job id. ``timeout`` (seconds, enforced by the parent) and
    ``retries`` (failed attempts retried with exponential backoff) default to ``JOB_TIMEOUT`` and ``JOB_RETRIES``.
    ``max_interruptions`` (put-backs after a stop before the job counts as failed; 0 = no limit) defaults to
    ``MAX_INTERRUPTIONS``; ``result_ttl`` (seconds its return value and status stay readable with ``get_job``
    once it is done; 0 = none) defaults to ``RESULT_TTL``.

    Periodic: ``every=`` seconds or ``cron=`` (5 fields, UTC unless ``tz=``), called with ``schedule_args`` and
    ``schedule_kwargs``; ``misfire_grace`` (seconds, default one interval): see ``worker/schedule.py``.
    """
    sched = schedule.declare(every, cron, tz, misfire_grace, schedule_args, schedule_kwargs)

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
        if result_ttl is not None and not result_ttl >= 0:
            raise ValueError("job result_ttl must be >= 0 seconds")
        _REGISTRY[job_name] = JobSpec(job_name, f, queue, timeout, retries, inspect.signature(f), max_interruptions,
                                      result_ttl, sched, arity_checker(f))
        f.job_name = job_name
        f.enqueue = lambda *a, **kw: enqueue(job_name, *a, **kw)
        # positional-only: a job's own parameters may be called name, seconds or when
        f.enqueue_in = lambda seconds, /, *a, **kw: enqueue_in(seconds, job_name, *a, **kw)
        f.enqueue_at = lambda when, /, *a, **kw: enqueue_at(when, job_name, *a, **kw)
        return f
    return register(fn) if fn is not None else register


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


def registered(name: str) -> Optional[JobSpec]:
    return _REGISTRY.get(name)


def registry() -> dict:
    return dict(_REGISTRY)


def import_modules(modules) -> None:
    """Import every ``JOB_MODULES`` entry (once, in the parent, before any fork). Raises :class:`ConfigError`."""
    for mod in modules:
        try:
            importlib.import_module(mod)
        except Exception as exc:  # the user's module may fail in any way; report it as config
            raise ConfigError(f"JOB_MODULES={','.join(modules)!r} is not valid: cannot import {mod!r} "
                              f"({type(exc).__name__}: {exc}); expected importable module paths") from None


def json_dumps(doc) -> str:
    """The one JSON encoding of payloads: compact, no NaN/Infinity (not JSON)."""
    return json.dumps(doc, separators=(",", ":"), allow_nan=False)


def build_payload(name: str, args, kwargs, queue: Optional[str], max_payload: int,
                  at: Optional[float] = None) -> tuple:
    """Validate and encode one job. Returns ``(job_id, queue, payload_json)``; raises TypeError/ValueError.

    ``enqueued_at`` is when the job becomes runnable (``at`` for scheduled jobs), so queue latency measures waiting
    for a worker, not a chosen delay."""
    spec = _REGISTRY.get(name)
    q = queue or (spec.queue if spec else DEFAULT_QUEUE)
    if not valid_queue_name(q):
        raise ValueError(f"invalid queue name {q!r}: expected {QUEUE_RULE} (the QUEUES rule)")
    job_id = uuid.uuid4().hex
    doc = {"id": job_id, "name": name, "queue": q, "args": list(args), "kwargs": dict(kwargs),
           "enqueued_at": round(at or time.time(), 6), "attempts": 0}
    try:
        payload = json_dumps(doc)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"job {name!r}: arguments must be JSON-serialisable ({exc})") from None
    if "\\ud" in payload:  # escapes of surrogates: pairs (emoji) are fine, lone ones are not
        _refuse_lone_surrogates(name, doc)
    size = _size(payload, max_payload)
    if size > max_payload:
        raise ValueError(f"job {name!r}: payload is {size} bytes, over MAX_PAYLOAD_BYTES={max_payload}")
    return job_id, q, payload


def _refuse_lone_surrogates(name, doc) -> None:
    """Redis's cjson cannot read a lone surrogate escape (``"\\udce9"``, e.g. from ``os.fsdecode`` of a Latin-1
    file name), so the scripts that move scheduled and orphaned jobs could not find the job's queue: refuse it here
    rather than let it land in the wrong queue later."""
    try:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = exc.object[max(0, exc.start - 20):exc.end + 20]
        raise ValueError(f"job {name!r}: arguments contain a lone surrogate ({bad!r}), which Redis's JSON cannot "
                         f"read; pass text as valid Unicode (bytes: e.g. os.fsencode(path).decode('latin-1') "
                         f"or base64)") from None


def _size(text: str, limit: int) -> int:
    """UTF-8 size of ``text``; encodes only when the character count cannot settle it (a UTF-8 character is at
    most 4 bytes), so the hot path pays nothing for small payloads."""
    n = len(text)
    return n if n * 4 <= limit or n > limit else len(text.encode("utf-8", "surrogateescape"))


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def parse(raw: str, max_payload: int) -> dict:
    """Parse and check the shape of a claimed queue entry, without the registry (the worker does not import the
    app). Returns the payload dict; raises :class:`BadJob`."""
    size = _size(raw, max_payload)
    if size > max_payload:
        raise BadJob(f"payload is {size} bytes, over MAX_PAYLOAD_BYTES={max_payload}")
    try:
        doc = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser's stack
        raise BadJob(f"payload is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(doc, dict):
        raise BadJob(f"payload is JSON {type(doc).__name__}, expected an object")
    for field, kind in (("id", str), ("name", str), ("args", list), ("kwargs", dict)):
        if not isinstance(doc.get(field), kind):
            raise BadJob(f"payload field {field!r} is missing or not a {kind.__name__}")
    # Bookkeeping fields written by other producers may be off; they must not break the worker's accounting.
    attempts = doc.get("attempts")
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 0:
        doc["attempts"] = 0
    if not isinstance(doc.get("errors", []), list):
        doc["errors"] = []
    return doc


def decode(raw: str, max_payload: int) -> tuple:
    """:func:`parse`, then check the name and arguments against the registry. Returns ``(spec, payload_dict)``;
    raises :class:`BadJob`."""
    doc = parse(raw, max_payload)
    spec = _REGISTRY.get(doc["name"])
    if spec is None:
        raise BadJob(f"job name {doc['name']!r} is not registered (JOB_MODULES)")
    try:
        spec.signature.bind(*doc["args"], **doc["kwargs"])
    except TypeError as exc:
        raise BadJob(f"arguments do not fit {spec.name}{spec.signature}: {exc}") from None
    return spec, doc


def meta() -> dict:
    """What the worker needs of each registered job, as JSON (the fork server sends it; the worker imports no app)."""
    return {name: {"queue": s.queue, "timeout": s.timeout, "retries": s.retries,
                   "max_interruptions": s.max_interruptions, "result_ttl": s.result_ttl, "schedule": schedule.check(s)}
            for name, s in _REGISTRY.items()}


def queue_of(raw: str, fallback: str) -> str:
    """The queue a payload names, else ``fallback`` (for claims re-adopted without their queue)."""
    try:
        doc = json.loads(raw)
        if isinstance(doc, dict) and isinstance(doc.get("queue"), str) and doc["queue"]:
            return doc["queue"]
    except (ValueError, RecursionError):  # RecursionError: absurdly nested input
        pass
    return fallback


def loose_id(raw: str) -> str:
    """The payload's own id when it has one, else a stable hash of the raw entry."""
    try:
        doc = json.loads(raw)
        if isinstance(doc, dict) and isinstance(doc.get("id"), str) and 0 < len(doc["id"]) <= 100:
            return doc["id"]
    except (ValueError, RecursionError):  # RecursionError: absurdly nested input
        pass
    return hashlib.sha1(raw.encode("utf-8", "surrogateescape")).hexdigest()


# --- enqueue API (module-level default connection, configured from the environment on first use) ---

_default = None


def _broker():
    global _default
    if _default is None:
        from . import config as _config
        from .fetch import Broker
        from .client import connect
        cfg = _config.load()
        _default = Broker(connect(cfg, name="enqueue"), cfg)
    return _default


def use(broker) -> None:
    """Set the broker used by the module-level enqueue functions (the CLI and tests do this)."""
    global _default
    _default = broker


def _check_name(name, queue=None):
    """A non-empty name, and a known destination: ``queue`` given, or the name registered in this process (its
    ``@job(queue=)``). Otherwise the job would silently go to ``default``, or to no worker that knows it."""
    if not isinstance(name, str) or not name:
        raise TypeError("job name must be a non-empty string")
    if queue is None and name not in _REGISTRY:
        raise ValueError(f"job {name!r} is not registered in this process, so its queue is unknown: import the "
                         f"module that defines it (e.g. `import myapp.jobs`, the module named in JOB_MODULES) or "
                         f"pass queue=\"...\" explicitly")


def enqueue(name: str, /, *args: Any, queue: Optional[str] = None, **kwargs: Any) -> str:
    """Put job ``name`` on its queue (or ``queue``) with JSON arguments; returns the job id.

    A name that is not registered in this process (its module not imported) needs ``queue``: ``ValueError``
    otherwise.

    ``queue`` is reserved for the runtime; pass a job argument named ``queue`` through ``enqueue_many``. Every
    other keyword (``name``, ``seconds``, ``when`` included) goes to the job.
    """
    _check_name(name, queue)
    return _broker().push(name, args, kwargs, queue=queue)


def enqueue_in(seconds: float, name: str, /, *args: Any, queue: Optional[str] = None, **kwargs: Any) -> str:
    """Schedule job ``name`` to be queued ``seconds`` from now (on the Redis clock, the one that moves scheduled
    jobs; 0 or less: now); returns the job id."""
    seconds = float(seconds)
    if not math.isfinite(seconds):
        raise ValueError(f"enqueue_in: seconds must be a finite number, not {seconds!r}")
    _check_name(name, queue)
    return _broker().push(name, args, kwargs, queue=queue, delay=seconds)


def enqueue_at(when: datetime, name: str, /, *args: Any, queue: Optional[str] = None, **kwargs: Any) -> str:
    """Schedule job ``name`` to be queued at ``when`` (naive datetimes are taken as UTC); returns the job id."""
    _check_name(name, queue)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return _broker().push(name, args, kwargs, queue=queue, due=when.timestamp())


def enqueue_many(name: str, calls, queue: Optional[str] = None) -> list:
    """Enqueue many calls of one job in a few round trips. ``calls`` yields ``(args, kwargs)`` pairs or argument
    lists; returns the job ids in order."""
    _check_name(name, queue)
    return _broker().push_many(name, calls, queue=queue)
