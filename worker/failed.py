"""The failed registry: list, retry and remove failed jobs (Python API and ``python -m worker failed ...``).

Records live in ``P:failed`` (ZSET id -> failure time, ms) and ``P:failed:data`` (HASH id -> JSON record with the
payload, cause, exception type, message, traceback, worker, queue, attempts, failed_at and history). The registry is
bounded by ``FAILED_MAX`` and ``FAILED_TTL``: every new failure trims the oldest (see ``fetch.py``).
"""
from __future__ import annotations

import json
import time
from typing import Iterable, Optional

from .lua import Registry, calls


def _loads(raw):
    try:
        return json.loads(raw) if raw else None
    except (ValueError, TypeError, RecursionError):
        return None


def record(raw, job_id, name, queue, worker, attempts, cause, res, history) -> dict:
    """A failed-registry record (the JSON shape ``failed list --json`` shows)."""
    return {"id": job_id, "name": name, "queue": queue, "payload": raw, "cause": cause,
            "type": res.get("type") or cause, "message": res.get("message") or "",
            "traceback": res.get("traceback") or "", "worker": worker, "attempts": attempts,
            "failed_at": time.time(), "history": history}


class FailedRegistry:
    """Operations on the failed registry through a :class:`worker.fetch.Broker`."""

    def __init__(self, broker):
        self.broker = broker
        self.r = broker.r
        self.k = broker.keys
        self.scripts = Registry(self.r)

    def count(self) -> int:
        return self.r.zcard(self.k.failed)

    def ids(self, limit: Optional[int] = None) -> list:
        """Failed job ids, newest first (all, or the newest ``limit``)."""
        if limit is None:
            return self.r.zrevrange(self.k.failed, 0, -1)
        if limit < 0:
            raise ValueError(f"limit must be 0 or more, not {limit}")
        return self.r.zrevrange(self.k.failed, 0, limit - 1) if limit else []

    def get(self, job_id: str) -> Optional[dict]:
        """The record, or None when there is none or it is junk (not a JSON object)."""
        rec = _loads(self.r.hget(self.k.failed_data, job_id))
        return rec if isinstance(rec, dict) else None

    def list(self, limit: int = 50) -> list:
        """The newest ``limit`` readable records (junk records are left out: ``worker.api`` says which)."""
        ids = self.ids(limit)
        if not ids:
            return []
        recs = [_loads(raw) for raw in self.r.hmget(self.k.failed_data, ids)]
        return [rec for rec in recs if isinstance(rec, dict)]

    def retry(self, ids: Iterable[str]) -> list:
        """Put these failed jobs back on their queues (``worker/lua/retry_failed.lua``: atomically with the removal
        of their records, attempts reset, history kept); returns the ids actually moved."""
        ids, moved = list(ids), []
        for i in range(0, len(ids), 500):
            moved += self.scripts.run(calls.retry_failed(self.k, ids[i:i + 500]))
        return moved

    def remove(self, ids: Iterable[str]) -> int:
        ids, n = list(ids), 0
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            with self.r.pipeline(transaction=True) as pipe:
                pipe.zrem(self.k.failed, *chunk)
                pipe.hdel(self.k.failed_data, *chunk)
                n += pipe.execute()[0]
        return n


class Registries:
    """:class:`FailedRegistry`'s ``ids``/``retry``/``remove`` over every group's key space (QUEUE_GROUPS; one
    registry when ungrouped): an id is in one group's registry, so each group acts on the ids it holds."""

    def __init__(self, broker):
        self.regs = [FailedRegistry(b) for b in broker.spaces()]

    def ids(self) -> list:
        return [i for reg in self.regs for i in reg.ids()]

    def retry(self, ids) -> list:
        ids = list(ids)
        return [i for reg in self.regs for i in reg.retry(ids)]

    def remove(self, ids) -> int:
        ids = list(ids)
        return sum(reg.remove(ids) for reg in self.regs)


def _age(ts) -> str:
    try:
        s = max(0, time.time() - float(ts))
    except (TypeError, ValueError):
        return "?"
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"


def main(cfg, args) -> int:
    """CLI: ``failed [list] [--json] [--limit N] [--name N] [--type T]``, ``failed show ID``,
    ``failed retry ID|--all``, ``failed remove ID|--all``. Listing and showing read through the read model
    (``worker.api``): records past FAILED_TTL are trimmed first, junk records are skipped and said so."""
    import sys

    from .api_groups import read_model
    from .client import connect
    from .fetch import Broker
    broker = Broker(connect(cfg, name="failed-cli"), cfg)
    reg, api = Registries(broker), read_model(broker.r, cfg)
    name, etype = getattr(args, "name", None) or "", getattr(args, "type", None) or ""
    if args.action in ("retry", "remove"):
        if bool(args.id) == bool(args.all):
            print(f"error: failed {args.action} takes one job ID or --all", file=sys.stderr)
            return 2
        ids = (api.failed_matching(name, etype) if name or etype else reg.ids()) if args.all else [args.id]
        if args.action == "retry":
            moved = reg.retry(ids)
            why = (f"job {args.id!r} is queued or running again (an equal unique job, or its own id): it stays failed"
                   if not moved and not args.all and any(b.r.hexists(b.keys.failed_data, args.id)
                                                         for b in broker.spaces())
                   else f"no failed job {args.id!r}")
            print(f"retried {len(moved)} job(s)" + ("" if moved or args.all else f": {why}"))
            return 0 if moved or args.all else 1
        n = reg.remove(ids)
        print(f"removed {n} job(s)" + ("" if n or args.all else f": no failed job {args.id!r}"))
        return 0 if n or args.all else 1
    if args.action == "show":
        api.housekeep()
        raw = next((b.r.hget(b.keys.failed_data, args.id or "") for b in broker.spaces()
                    if b.r.hexists(b.keys.failed_data, args.id or "")), None)
        rec = api.failed_record(args.id or "")
        if rec is None:
            why = "its record is not a JSON object (junk; `failed remove` deletes it)" if raw else "no such record"
            print(f"error: no failed job {args.id!r}: {why}", file=sys.stderr)
            return 1
        print(json.dumps(rec, indent=2))
        return 0
    page = api.failed(name, etype, per_page=args.limit)
    records = page["jobs"]
    if args.json:
        print(json.dumps({"count": page["count"], "matched": page["matched"], "jobs": records,
                          "skipped": page["skipped"]}, indent=2))
        return 0
    print(f"{page['count']} failed job(s)" + (f", {page['matched']} matching" if name or etype else "")
          + (f", newest {len(records)} shown" if records else ""))
    if records:
        rows = [("ID", "NAME", "QUEUE", "CAUSE", "ATTEMPTS", "AGE", "ERROR")]
        for rec in records:
            err = f"{_text(rec.get('type'))}: {_text(rec.get('message'))}".replace("\n", " ")
            rows.append((_text(rec.get("id")), _text(rec.get("name")), _text(rec.get("queue")),
                         _text(rec.get("cause")), _text(rec.get("attempts")), _age(rec.get("failed_at")), err[:80]))
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        for row in rows:
            print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:6])) + "  " + row[6])
    for what in page["skipped"]:
        print(f"skipped: {what}")
    return 0


def _text(value) -> str:
    """A record field as one table cell: foreign records may hold any JSON type, or nothing."""
    return "" if value is None else value if isinstance(value, str) else json.dumps(value)
