"""``python -m worker status [--json]`` and ``pause``/``resume``: what the queues and workers are doing, in two
round trips, with every age measured on the Redis clock (one-off dynos may have skewed clocks; Redis has one).

``--json`` prints one object. Schema version 1 (fields may be added without a version bump; a rename, removal or
change of type or unit bumps ``schema``)::

    {
      "schema": 1,                    int    version of this layout
      "time": 1714560000.123,         float  now, unix seconds, Redis clock (TIME); every age below is against it
      "paused": ["default"],          [str]  members of P:paused, sorted; "*" means every queue
      "queues": [{                           sorted by name: P:queues + configured QUEUES + paused names
        "name": "default",            str
        "depth": 3,                   int    waiting jobs (LLEN)
        "latency": 12.5,              float|null  seconds the head (oldest) job has waited since its enqueued_at;
                                             0.0 when the queue is empty, null when the head is unreadable
        "paused": true                bool   the queue or "*" is in P:paused
      }],
      "workers": [{                          sorted by name: members of P:workers
        "name": "worker.1:4",         str    <$DYNO or host>:<pid>
        "dyno": "worker.1",           str|null
        "host": "3f2a...",            str|null
        "pid": 4,                     int|null
        "queues": ["default"],        [str]  as configured on that worker ("*" = every queue)
        "started": 1714559000.0,      float|null  unix seconds (the worker's clock)
        "state": "busy",              str    idle|busy|paused|stopping|exited as the worker wrote it, "dead" when
                                             its own deadline (last beat + its HEARTBEAT_TTL) has passed,
                                             "unknown" when its hash is missing
        "concurrency": 4,             int    WORKER_CONCURRENCY of that worker (1 for older workers)
        "slots": [{                          one entry per busy slot, by slot number (added in 1.x)
          "slot": 0,                  int
          "job": {                           the job claimed into that slot
            "id": "9c1e...", "name": "send_email", "queue": "default",   str|null each (null: unreadable payload)
            "running_for": 3.2        float|null  seconds since it was claimed (Redis clock)
          },
          "checkpoint": 1200          any|null  its last checkpoint() value as of the worker's last heartbeat
        }],
        "job": {...},                 object|null  the first busy slot's job (as "slots"[0].job), null when idle
        "heartbeat_age": 0.4          float  seconds since the last heartbeat (Redis clock)
      }],
      "failed": 1,                    int    jobs in the failed registry now (ZCARD P:failed)
      "scheduled": 0,                 int    retries and enqueue_in/at jobs not yet due (ZCARD P:scheduled)
      "totals": {"processed": 10, "failed": 2}   int  all-time counters P:stat:processed, P:stat:failed
      "schedules": [{                        periodic jobs, sorted by name, as workers last wrote them (added in 1.x)
        "name": "report", "queue": "default", "spec": "cron */5 * * * * UTC",   str each
        "last": 1714560000.0,         float|null  unix seconds of the last tick enqueued
        "next": 1714560300.0,         float|null  unix seconds of the next tick
        "skipped": null, "skip_reason": null     float|null, "late"|"paused"|null: the last tick not enqueued
      }]
    }

No output of this module contains the Redis password (the human header shows the redacted URL).
"""
from __future__ import annotations

import json
import sys
import time

from .client import connect
from .config import QUEUE_RULE, Config, redact_url, valid_queue_name
from . import schedule
from .keys import Keys
from .lua import WAKE

SCHEMA = 1




def _num(value, kind=float):
    """``kind(value)`` or None: worker hashes and payloads are written by other processes and may be partial."""
    try:
        return kind(value)
    except (TypeError, ValueError):
        return None


def _job(raw: str, job_started, now_ms: float):
    if not raw:
        return None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):  # anything can sit in a queue; status must still print
        doc = None
    doc = doc if isinstance(doc, dict) else {}
    started = _num(job_started)
    return {"id": doc.get("id"), "name": doc.get("name"), "queue": doc.get("queue"),
            "running_for": None if started is None else round(max(0.0, now_ms - started) / 1000.0, 3)}


def _worker(name: str, score: float, info: dict, now_ms: float, cfg: Config) -> dict:
    """One worker's entry. Its score in P:workers is its own deadline (beat + its TTL, hash field ``ttl``); workers
    of an older version wrote their last beat there instead and have no ``ttl``."""
    ttl = _num(info.get("ttl"))
    seen = _num(info.get("seen"))
    if ttl is None:
        seen, dead = score, now_ms - score > cfg.heartbeat_ttl * 1000
    else:
        seen, dead = (seen if seen is not None else score - ttl), score < now_ms
    state = info.get("state") or "unknown"
    if dead:
        state = "dead"  # recovery will requeue its jobs; until then it is listed so the operator sees why
    slots = []
    for field, raw in info.items():
        if field.startswith("job:"):
            slot = _num(field[4:], int)
            slots.append({"slot": slot, "job": _job(raw, info.get(f"started:{field[4:]}"), now_ms),
                          "checkpoint": _checkpoint(info.get(f"ckpt:{field[4:]}"))})
    if info.get("job"):  # an older worker's single job
        slots.append({"slot": 0, "job": _job(info["job"], info.get("job_started"), now_ms), "checkpoint": None})
    slots.sort(key=lambda s: s["slot"] if s["slot"] is not None else -1)
    return {
        "name": name, "dyno": info.get("dyno") or None, "host": info.get("host") or None,
        "pid": _num(info.get("pid"), int), "queues": [q for q in (info.get("queues") or "").split(",") if q],
        "started": _num(info.get("started")), "state": state, "concurrency": _num(info.get("concurrency"), int) or 1,
        "job": slots[0]["job"] if slots else None, "slots": slots,
        "heartbeat_age": round(max(0.0, now_ms - seen) / 1000.0, 3)}


def _checkpoint(raw):
    """A running job's last checkpoint as the worker saved it (at its last heartbeat), or None."""
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def _latency(head, now: float):
    if head is None:
        return 0.0
    try:
        doc = json.loads(head)
        at = float(doc["enqueued_at"])
        if at != at or at in (float("inf"), float("-inf")):
            return None
    except (ValueError, TypeError, KeyError, RecursionError, OverflowError, IndexError, AttributeError):
        return None  # anyone can push anything to a queue: an unreadable head has an unknown latency
    # The producer's clock may run ahead of Redis's: a job cannot have waited less than nothing.
    return round(max(0.0, now - at), 3)


def collect(r, cfg: Config) -> dict:
    """Read everything ``status`` shows and return it as the version-1 JSON document (see the module docstring).

    Two pipelined round trips whatever the number of queues and workers: first the sets and counters, then one
    LLEN + LINDEX per queue and one HGETALL per worker.
    """
    k = Keys(cfg.key_prefix)
    with r.pipeline(transaction=False) as p:
        p.time().smembers(k.queues).smembers(k.paused).zrange(k.workers, 0, -1, withscores=True)
        p.zcard(k.failed).zcard(k.scheduled).get(k.processed).get(k.failed_count)
        (sec, usec), known, paused, workers, n_failed, n_scheduled, processed, failed_total = p.execute()
    now = sec + usec / 1e6
    now_ms = now * 1000.0
    names = sorted(set(known) | {q for q in cfg.queues if q != "*"} | (set(paused) - {"*"}))
    with r.pipeline(transaction=False) as p:
        for q in names:
            p.llen(k.queue(q)).lindex(k.queue(q), 0)
        for w, _ in workers:
            p.hgetall(k.worker(w))
        res = p.execute()
    queues = [{"name": q, "depth": res[2 * i], "latency": _latency(res[2 * i + 1], now),
               "paused": q in paused or "*" in paused} for i, q in enumerate(names)]
    out_workers = [_worker(w, score, info, now_ms, cfg) for (w, score), info in zip(workers, res[2 * len(names):])]
    return {"schema": SCHEMA, "time": round(now, 6), "paused": sorted(paused), "queues": queues,
            "workers": sorted(out_workers, key=lambda w: w["name"]), "failed": n_failed, "scheduled": n_scheduled,
            "totals": {"processed": _num(processed, int) or 0, "failed": _num(failed_total, int) or 0},
            "schedules": schedule.collect(r, cfg.key_prefix, now_ms)}


def _dur(seconds) -> str:
    """A compact, space-free duration (tables stay splittable on whitespace): 4.2s, 3m05s, 2h01m, 3d04h."""
    if seconds is None:
        return "?"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f}s"
    s = int(s)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _short(value) -> str:
    """A checkpoint in one table cell: compact JSON, no spaces, at most 24 characters."""
    if value is None:
        return "-"
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=True).replace(" ", "_")
    return text if len(text) <= 24 else text[:23] + "~"


def _table(headers, rows, right=()) -> list:
    """Aligned columns; numeric columns (indexes in ``right``) are right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    lines = []
    for row in [headers, *rows]:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def render(doc: dict, url: str) -> str:
    """The human view of :func:`collect`'s document: queues, workers and totals tables."""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(doc["time"]))
    out = [f"worker status at {when} (Redis clock), {redact_url(url)}", ""]
    if "*" in doc["paused"]:
        out += ["ALL QUEUES PAUSED (python -m worker resume)", ""]
    rows = [(q["name"], q["depth"], "-" if q["depth"] == 0 else _dur(q["latency"]), "yes" if q["paused"] else "no")
            for q in doc["queues"]]
    out += (_table(("QUEUE", "DEPTH", "LATENCY", "PAUSED"), rows, right=(1, 2)) if rows else ["no queues"]) + [""]
    rows = []
    for w in doc["workers"]:
        for n, sl in enumerate(w["slots"] or [{}]):
            j = sl.get("job") or {}
            head = (w["name"], w["state"], f"{len(w['slots'])}/{w['concurrency']}", ",".join(w["queues"]) or "-") \
                if n == 0 else ("", "", "", "")  # further jobs of the same worker: one row each
            rows.append((*head, j.get("name") or "-", (j.get("id") or "-")[:8],
                         _dur(j["running_for"]) if j else "-", _short(sl.get("checkpoint")),
                         _dur(w["heartbeat_age"]) if n == 0 else "", (w["host"] or "-") if n == 0 else ""))
    out += (_table(("WORKER", "STATE", "SLOTS", "QUEUES", "JOB", "ID", "RUNNING", "CHECKPOINT", "HEARTBEAT", "HOST"),
                   rows, right=(6, 8)) if rows else ["no workers"]) + [""]
    out += schedule.render(doc.get("schedules") or [], _table, doc["paused"])
    t = doc["totals"]
    out += _table(("FAILED", "SCHEDULED", "PROCESSED_TOTAL", "FAILED_TOTAL"),
                  [(doc["failed"], doc["scheduled"], t["processed"], t["failed"])], right=(0, 1, 2, 3))
    return "\n".join(out)


def main(cfg: Config, as_json: bool = False) -> int:
    """``python -m worker status``: print the tables (or the JSON document); exit code 0."""
    r = connect(cfg, name="status")
    try:
        doc = collect(r, cfg)
    finally:
        r.close()
    print(json.dumps(doc, separators=(",", ":")) if as_json else render(doc, cfg.redis_url))
    return 0


def pause(cfg: Config, queue: str, paused: bool) -> int:
    """``pause``/``resume [--queue Q]`` (``*`` = every queue): edit P:paused for every worker; exit code 0, or 2 on a
    bad queue name.

    Workers check P:paused inside their claim script and poll at least once a second, so a pause takes effect
    within about a second without any message to them. A resume also rings the wake list of the resumed queue(s),
    so idle workers blocked on it claim at once instead of at their next poll.
    """
    if queue != "*" and not valid_queue_name(queue):
        print(f"error: invalid queue name {queue!r}: expected * or {QUEUE_RULE} (the QUEUES rule)", file=sys.stderr)
        return 2
    k = Keys(cfg.key_prefix)
    r = connect(cfg, name="status")
    try:
        with r.pipeline(transaction=False) as p:
            if paused:
                p.sadd(k.paused, queue)
            elif queue == "*":
                p.delete(k.paused)  # plain `resume` undoes every pause, named ones included
            else:
                p.srem(k.paused, queue)
            p.smembers(k.queues)
            changed, known = p.execute()[:2]
        if not paused:
            targets = sorted(known) if queue == "*" else [queue]
            if targets:
                r.eval(WAKE, len(targets), *[k.wake(q) for q in targets])
        still = sorted(r.smembers(k.paused))
    finally:
        r.close()
    what = "every queue" if queue == "*" else f"queue {queue}"
    verb = "paused" if paused else "resumed"
    line = f"{verb} {what}" if changed else f"{what} was {'already' if paused else 'not'} paused: nothing changed"
    notes = []
    if queue != "*" and queue not in known:
        notes.append("not yet known to Redis")
    if not paused and still:
        notes.append("still paused: " + ",".join(still))  # resuming one queue leaves `pause` of * in force
    print(line + (f" ({'; '.join(notes)})" if notes else ""))
    return 0
