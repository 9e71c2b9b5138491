"""The read model's values (worker/api.py): junk-tolerant conversions of what other processes wrote, and the
display formats the CLI and the dashboard share. Pure functions: no Redis, no I/O.

Every reader tolerates junk (records written by foreign producers, wrong-typed fields, non-JSON): these helpers
return None for what they cannot read, never raise (issue 27 item 9).
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Optional


def as_num(value, kind=float):
    """``kind(value)`` or None: worker hashes and payloads are written by other processes and may be partial."""
    try:
        out = kind(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return None if out != out or out in (float("inf"), float("-inf")) else out


def as_str(value) -> Optional[str]:
    """A field shown as text: strings as they are, numbers as text, anything else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def parse_json(raw) -> Any:
    """The JSON value of ``raw``, or None when it is empty or not JSON."""
    try:
        return json.loads(raw) if raw else None
    except (ValueError, TypeError, RecursionError):
        return None


def elapsed(a, b) -> Optional[float]:
    """``a - b`` in seconds (never negative, 3 decimals), or None when either is unknown."""
    a, b = as_num(a), as_num(b)
    return None if a is None or b is None else round(max(0.0, a - b), 3)


def iso(seconds) -> Optional[str]:
    """Unix seconds as an ISO 8601 UTC time with milliseconds (``2026-12-06T18:12:50.123Z``), or None."""
    s = as_num(seconds)
    if s is None:
        return None
    try:
        return datetime.fromtimestamp(s, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    except (OverflowError, OSError, ValueError):
        return None


def duration(seconds) -> str:
    """A compact, space-free duration: 4.2s, 3m05s, 2h01m, 3d04h; ``?`` when unknown."""
    s = as_num(seconds)
    if s is None:
        return "?"
    if s < 60:
        return f"{max(0.0, s):.1f}s"
    s = int(s)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def latency(head, now: float):
    """Seconds the head (oldest) payload has waited: 0.0 for an empty queue, None when its head is unreadable."""
    if head is None:
        return 0.0
    doc = parse_json(head)
    at = as_num(doc.get("enqueued_at")) if isinstance(doc, dict) else None
    if at is None:
        return None  # anyone can push anything to a queue: an unreadable head has an unknown latency
    return round(max(0.0, now - at), 3)  # the producer's clock may run ahead of Redis's


def summary(raw, now: Optional[float] = None) -> dict:
    """One waiting/scheduled payload as shown in a list: id, name, queue, args, kwargs, enqueued_at, attempts;
    ``junk`` True (and the raw text kept, shortened) when it is not a job object."""
    doc = parse_json(raw)
    if not isinstance(doc, dict):
        text = raw if isinstance(raw, str) else repr(raw)
        return {"id": None, "name": None, "queue": None, "args": None, "kwargs": None, "enqueued_at": None,
                "attempts": None, "junk": True, "raw": text[:200]}
    return {"id": as_str(doc.get("id")), "name": as_str(doc.get("name")), "queue": as_str(doc.get("queue")),
            "args": doc.get("args"), "kwargs": doc.get("kwargs"), "enqueued_at": as_num(doc.get("enqueued_at")),
            "attempts": as_num(doc.get("attempts"), int), "junk": False}
