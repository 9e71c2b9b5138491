"""The job payload: the one JSON object stored in a queue, built by producers and checked by the worker.

::

    {"id": "<32 hex>", "name": "<registered name>", "queue": "<q>", "args": [...], "kwargs": {...},
     "enqueued_at": <unix seconds>, "attempts": <failed or lost attempts so far>, "errors": [<history>],
     "options": {<per-call options: timeout, retries, result_ttl, max_interruptions>}}   (only when given)

An id is ours (32 hex) or the producer's own (``job_id=``: :data:`JOB_ID_RULE`).

Only JSON is ever written or read (never pickle). ``REGISTRY`` is the table of job names registered in this process
(filled by :func:`worker.jobs.job`): a payload built for a registered name goes to that job's queue. This module
imports nothing of the runtime but ``config``, so the broker (``fetch.py``) and the registry (``jobs.py``) both
build on it without importing each other.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import reprlib
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Optional

from .config import MAX_TTL, QUEUE_RULE, valid_queue_name

DEFAULT_QUEUE = "default"

REGISTRY: dict = {}  # job name -> jobs.JobSpec, filled by @job


class BadJob(Exception):
    """A queue entry that cannot be run; the message is the reason recorded in the failed registry."""


def json_dumps(doc) -> str:
    """The one JSON encoding of payloads: compact, no NaN/Infinity (not JSON)."""
    return json.dumps(doc, separators=(",", ":"), allow_nan=False)


JOB_ID_RULE = "1-100 characters, each a letter, digit, '-', '_', '.' or ':'"
_JOB_ID = re.compile(r"[A-Za-z0-9_.:-]{1,100}\Z")
#: the options a call may set for its job (``f.options(...)``), carried in the payload's "options"; they win over
#: ``@job``'s (``jobs.JobOptions.resolve``)
PER_CALL = ("timeout", "retries", "result_ttl", "max_interruptions")


def check_job_id(job_id) -> str:
    """A producer's own job id, or TypeError/ValueError naming the rule."""
    if not isinstance(job_id, str):
        raise TypeError(f"job_id must be a str, not {type(job_id).__name__}")
    if not _JOB_ID.match(job_id):
        raise ValueError(f"invalid job_id {job_id[:120]!r}: expected {JOB_ID_RULE}")
    return job_id


def check_options(opts: dict) -> dict:
    """Per-call options (:data:`PER_CALL`; None = not set) validated; raises TypeError/ValueError naming the bad
    one. The worker reads a payload's "options" through it too, ignoring what fails (a foreign producer's)."""
    out = {}
    for name, value in opts.items():
        if value is None:
            continue
        if name not in PER_CALL:
            raise TypeError(f"unknown job option {name!r}: expected one of {', '.join(PER_CALL)}")
        whole = name in ("retries", "max_interruptions")
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
            raise TypeError(f"job option {name}= must be {'an int' if whole else 'a number of seconds'}, not "
                            f"{type(value).__name__}")
        if not math.isfinite(value) or value < 0 or (name == "result_ttl" and value > MAX_TTL):
            top = f" and <= {MAX_TTL:g}" if name == "result_ttl" else ""
            raise ValueError(f"job option {name}= must be >= 0{top}, not {value!r}")
        out[name] = value
    return out
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxlong, _SHORT.maxother = 4, 200, 200, 1 << 20
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxset = _SHORT.maxfrozenset = _SHORT.maxdeque = _SHORT.maxarray = 60
_SHORT.maxdict = 30


def unserializable(value, exc: BaseException) -> tuple:
    """``(marker, warning)`` for a job's return value that is not JSON (issue 24 item 8): the job is done, its work
    is not repeated for a serialisation problem, and its result is this marker instead. ``@job(strict_result=True)``
    fails such a job instead."""
    kind = type(value).__name__
    try:  # reprlib: a set of a million items is not turned into megabytes of text to keep 200 characters of it
        shown = _SHORT.repr(value)
    except Exception as err:  # an app's __repr__ may raise anything
        shown = f"<repr failed: {type(err).__name__}>"
    warning = f"result_unserializable: the job returned a {kind}, which is not JSON ({type(exc).__name__}: {exc})"
    return {"unserializable": kind, "repr": shown[:200]}, warning[:500]


def delay_of(seconds) -> float:
    """``enqueue_in``'s ``seconds`` (a number or a ``timedelta``) as a finite float; TypeError/ValueError else."""
    if isinstance(seconds, timedelta):
        seconds = seconds.total_seconds()
    elif isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"enqueue_in: expected seconds as an int, float or datetime.timedelta, not "
                        f"{type(seconds).__name__}")
    seconds = float(seconds)
    if not math.isfinite(seconds):
        raise ValueError(f"enqueue_in: seconds must be a finite number, not {seconds!r}")
    return seconds


def due_of(when) -> float:
    """``enqueue_at``'s ``when`` (a ``datetime``, naive = UTC) as a unix time; TypeError for anything else."""
    if not isinstance(when, datetime):
        raise TypeError(f"enqueue_at: expected when as a datetime.datetime (naive = UTC), not {type(when).__name__}; "
                        f"for a delay use enqueue_in(seconds or timedelta, ...)")
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def valid_options(raw) -> dict:
    """The valid per-call options of a claimed payload's "options" (a foreign producer's junk is ignored)."""
    out = {}
    for name, value in (raw.items() if isinstance(raw, dict) else ()):
        try:
            out.update(check_options({name: value}))
        except (TypeError, ValueError):
            pass
    return out


def build_payload(name: str, args, kwargs, queue: Optional[str], max_payload: int,
                  at: Optional[float] = None, job_id: Optional[str] = None, options: Optional[dict] = None) -> tuple:
    """Validate and encode one job. Returns ``(job_id, queue, payload_json)``; raises TypeError/ValueError.

    ``enqueued_at`` is when the job becomes runnable (``at`` for scheduled jobs), so queue latency measures waiting
    for a worker, not a chosen delay."""
    spec = REGISTRY.get(name)
    q = queue or (spec.queue if spec else DEFAULT_QUEUE)
    if not valid_queue_name(q):
        raise ValueError(f"invalid queue name {q!r}: expected {QUEUE_RULE} (the QUEUES rule)")
    job_id = uuid.uuid4().hex if job_id is None else check_job_id(job_id)
    doc = {"id": job_id, "name": name, "queue": q, "args": list(args), "kwargs": dict(kwargs),
           "enqueued_at": round(at or time.time(), 6), "attempts": 0}
    if options:
        doc["options"] = check_options(options)
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
    bad = lone_surrogate(doc)
    if bad is not None:
        raise ValueError(f"job {name!r}: arguments contain a lone surrogate ({bad!r}), which Redis's JSON cannot "
                         f"read; pass text as valid Unicode (bytes: e.g. os.fsencode(path).decode('latin-1') "
                         f"or base64)")


def lone_surrogate(doc) -> Optional[str]:
    """The text around a lone surrogate in ``doc`` (which Redis's cjson cannot read), or None."""
    try:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.object[max(0, exc.start - 20):exc.end + 20]
    return None


def _size(text: str, limit: int) -> int:
    """UTF-8 size of ``text``; encodes only when the character count cannot settle it (a UTF-8 character is at
    most 4 bytes), so the hot path pays nothing for small payloads."""
    n = len(text)
    return n if n * 4 <= limit or n > limit else len(text.encode("utf-8", "surrogateescape"))


MAX_ID = 100  # characters of a job id (ours are 32)

# What the runtime itself adds to a payload (issue 27 item 3). MAX_PAYLOAD_BYTES bounds what the producer sent; the
# runtime adds a checkpoint (at most child.MAX_CHECKPOINT = 64 KiB of JSON), attempts, interruptions, enqueued_at and
# an error history of at most HISTORY_KEEP entries of short fields (HISTORY_FIELD characters each: policy.py and
# lua.RECOVER trim them). A recovery appends its fragment (lua.RECOVER) to a payload that may already carry the
# same fields (a retry's), so up to twice that. A claimed entry is refused if what is left once its runtime fields
# are discounted (at most this much) is over MAX_PAYLOAD_BYTES: the runtime's own bookkeeping never turns an accepted
# job into a bad payload, and a producer that writes its own payloads gets the same limit as enqueue.
HISTORY_KEEP = 10
HISTORY_FIELD = 500
RUNTIME_ALLOWANCE = 2 * (64 * 1024 + (HISTORY_KEEP + 1) * (5 * HISTORY_FIELD + 100)) + 1024


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _finite(text):
    """JSON numbers only: ``1e999`` would run as infinity, which no payload can carry back (issue 27 item 10)."""
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is out of range (infinity is not JSON)")
    return value


def history_entry(entry) -> Optional[dict]:
    """An error-history entry as the runtime carries it: known fields only, each short (a foreign producer's
    entries may be anything), or None if it is not an entry."""
    if not isinstance(entry, dict):
        return None
    out = {}
    for field in ("at", "worker", "cause", "type", "message"):
        value = entry.get(field)
        if isinstance(value, str):
            out[field] = value[:HISTORY_FIELD]
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e15:
            out[field] = value
    return out


def parse(raw: str, max_payload: int) -> dict:
    """Parse and check the shape of a claimed queue entry, without the registry (the worker does not import the
    app). Returns the payload dict; raises :class:`BadJob`."""
    size = _size(raw, max_payload)
    if size > max_payload:  # exact bytes, unless so long that it is over in any case (never parsed)
        size = len(raw.encode("utf-8", "surrogateescape")) if len(raw) <= max_payload + RUNTIME_ALLOWANCE else len(raw)
        if size > max_payload + RUNTIME_ALLOWANCE:
            raise BadJob(f"payload is {size} bytes, over MAX_PAYLOAD_BYTES={max_payload}")
    try:
        doc = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser's stack
        raise BadJob(f"payload is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(doc, dict):
        raise BadJob(f"payload is JSON {type(doc).__name__}, expected an object")
    for field, kind in (("id", str), ("name", str), ("args", list), ("kwargs", dict)):
        if not isinstance(doc.get(field), kind):
            raise BadJob(f"payload field {field!r} is missing or not a {kind.__name__}")
    if not 0 < len(doc["id"]) <= MAX_ID:  # recovery and the status records key on it: it must name the job
        raise BadJob(f"payload field 'id' is {len(doc['id'])} characters, expected 1-{MAX_ID}")
    if "\\ud" in raw or "\\uD" in raw:  # an escaped surrogate: pairs (emoji) are fine, a lone one is not
        bad = lone_surrogate(doc)
        if bad is not None:  # Redis's scripts (cjson) could not read it to recover or retry it: refuse it now
            raise BadJob(f"payload contains a lone surrogate ({bad!r}), which Redis's JSON cannot read")
    if size > max_payload and size - _runtime_bytes(raw, doc) > max_payload:
        raise BadJob(f"payload is {size} bytes, over MAX_PAYLOAD_BYTES={max_payload} "
                     f"(not counting the runtime's own fields)")
    # Bookkeeping fields written by other producers may be off; they must not break the worker's accounting.
    attempts = doc.get("attempts")
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 0:
        doc["attempts"] = 0
    if not isinstance(doc.get("errors", []), list):
        doc["errors"] = []
    return doc


def _runtime_bytes(raw: str, doc: dict) -> int:
    """About how many bytes of ``raw`` the runtime added (see RUNTIME_ALLOWANCE, its bound): the checkpoint and the
    error history, and a recovery's appended fragment (``"_rt":<offset>``, lua.RECOVER) beside their earlier copy."""
    n = 0
    for field in ("checkpoint", "errors"):
        if field in doc:
            n += len(field) + 4 + len(json.dumps(doc[field], separators=(",", ":")))
    at = doc.get("_rt")  # a byte offset (Lua strings are bytes)
    if isinstance(at, int) and not isinstance(at, bool) and 0 < at < len(raw) * 4:
        data = raw.encode("utf-8", "surrogateescape")
        if data.startswith(f',"_rt":{at},'.encode(), at):
            n += len(data) - at
    return min(n, RUNTIME_ALLOWANCE)


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
        if isinstance(doc, dict) and isinstance(doc.get("id"), str) and 0 < len(doc["id"]) <= MAX_ID:
            return doc["id"]
    except (ValueError, RecursionError):  # RecursionError: absurdly nested input
        pass
    return hashlib.sha1(raw.encode("utf-8", "surrogateescape")).hexdigest()


# --- unique jobs (issue 25 item 1): the lock IS the job id, so enqueue.lua's job_id= dedupe is the whole lock ---

def unique_keys(value, signature) -> Optional[tuple]:
    """``@job(unique=...)`` checked at decoration: None (not unique), ``()`` (True: every argument) or the tuple of
    parameter names to key on; anything else raises TypeError."""
    if value is None or value is False:
        return None
    if value is True:
        return ()
    params = signature.parameters
    if not isinstance(value, tuple) or not value or not all(isinstance(n, str) and n in params for n in value):
        raise TypeError(f"@job(unique=...) must be True or a non-empty tuple of the function's parameter names "
                        f"{tuple(params)}, not {value!r}")
    return value


def is_unique(name: str) -> bool:
    """Whether ``name`` is a job registered in this process with ``@job(unique=...)``."""
    return getattr(REGISTRY.get(name), "unique", None) is not None


def unique_id(name: str, args, kwargs) -> Optional[str]:
    """The job id of a call of a unique registered job (None: not unique): ``u:<name>:<sha256 hex32>`` of the
    canonical JSON of its arguments bound through the signature (defaults applied, so ``f(1)``, ``f(x=1)`` and
    ``f(1, y=<default>)`` are one key), all of them or the named ones. The name is hashed too; a name that does
    not fit :data:`JOB_ID_RULE` gives ``u:<hex40>``.

    ``unique_until="start"``: two jobs of one key may exist (one running, one waiting), so the id is the key plus a
    random part, ``us:<name>:<hex32>:<hex16>`` (or ``us:<hex40>:<hex16>``), and the lock is ``P:unique:us:<...>``,
    the id without its last part (enqueue.lua, and the claim frees it: cycle.lua)."""
    if not is_unique(name):
        return None
    spec, keys = REGISTRY[name], REGISTRY[name].unique
    bound = spec.signature.bind(*args, **kwargs)
    bound.apply_defaults()
    values = dict(bound.arguments) if not keys else {k: bound.arguments[k] for k in keys}
    try:
        blob = json.dumps([name, values], sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"job {name!r}: arguments must be JSON-serialisable ({exc})") from None
    digest = hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()
    if spec.unique_until == "start":
        job_id = f"us:{name}:{digest[:32]}:{uuid.uuid4().hex[:16]}"
        return job_id if _JOB_ID.match(job_id) else f"us:{digest[:40]}:{job_id[-16:]}"
    job_id = f"u:{name}:{digest[:32]}"
    return job_id if _JOB_ID.match(job_id) else f"u:{digest[:40]}"


def unique_lock(job_id: str) -> Optional[str]:
    """The key (``P:unique:<this>``) a ``unique_until="start"`` job id holds while it waits to start, else None."""
    return job_id.rsplit(":", 1)[0] if job_id.startswith("us:") and job_id.count(":") >= 2 else None
