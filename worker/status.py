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
      }],
      "throughput": [{"minute": 1714556400, "processed": 12, "failed": 0}],   the last hour, one entry per minute
                                             (unix seconds of its start); counts null where no minute sample exists
      "skipped": ["worker w:1 slot 0: unreadable job payload"]   [str]  junk the reader could not show (added 1.x)
    }

No output of this module contains the Redis password (the human header shows the redacted URL).
"""
from __future__ import annotations

import json
import sys
import time

from .api import duration
from .api_groups import read_model
from .client import connect, for_space
from .config import QUEUE_RULE, Config, redact_url, valid_queue_name
from . import schedule
from .keys import Keys
from .lua import Registry, calls


def collect(r, cfg: Config) -> dict:
    """Everything ``status`` shows, as the version-1 JSON document (see the module docstring), read through the
    shared read model (worker/api.py), so the CLI and the dashboard never disagree. Also trims failed records past
    FAILED_TTL and samples this minute's counters (api.HOUSEKEEP)."""
    return read_model(r, cfg).overview()


_dur = duration


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
    if doc.get("groups"):  # QUEUE_GROUPS: which group (key space) each queue is in
        rows = [(*row, q["group"]) for row, q in zip(rows, doc["queues"])]
    heads = ("QUEUE", "DEPTH", "LATENCY", "PAUSED") + (("GROUP",) if doc.get("groups") else ())
    out += (_table(heads, rows, right=(1, 2)) if rows else ["no queues"]) + [""]
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
    for what in doc.get("skipped") or []:
        out.append(f"skipped: {what}")  # junk the read model could not show (issue 27 item 9)
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
    if queue == "*":
        spaces = cfg.spaces()
    else:
        try:
            spaces = [cfg.space(cfg.group_of(queue))] if cfg.queue_groups else [cfg]
        except ValueError as exc:  # QUEUE_GROUPS: a queue in no group is in no key space
            print(f"error: {exc}", file=sys.stderr)
            return 2
    r = connect(cfg, name="status")
    changed, known, still = 0, set(), set()
    try:
        for space in spaces:  # QUEUE_GROUPS: each group's key space (one, ungrouped)
            c, kn, st = _pause_space(for_space(r, space.key_prefix), Keys(space.key_prefix), queue, paused)
            changed, known, still = changed + c, known | kn, still | st
    finally:
        r.close()
    what = "every queue" if queue == "*" else f"queue {queue}"
    verb = "paused" if paused else "resumed"
    line = f"{verb} {what}" if changed else f"{what} was {'already' if paused else 'not'} paused: nothing changed"
    notes = []
    if queue != "*" and queue not in known:
        notes.append("not yet known to Redis")
    if not paused and still:
        notes.append("still paused: " + ",".join(sorted(still)))  # resuming one queue leaves `pause` of * in force
    print(line + (f" ({'; '.join(notes)})" if notes else ""))
    return 0


def _pause_space(r, k, queue: str, paused: bool) -> tuple:
    """``(changed, known queues, still paused)`` after pausing/resuming ``queue`` in the key space of ``k``."""
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
            Registry(r).run(calls.wake(k, targets))
    return changed, set(known), set(r.smembers(k.paused))


def job_main(cfg, job_id: str, as_json: bool = False) -> int:
    """``python -m worker job ID [--json]``: exit 0 and print the job, or exit 1 if it is unknown or expired.

    A renderer over the read model (``worker.api.API.job``): times are ISO 8601 UTC, with how long the job waited
    and ran; ``--json`` prints the read model's object (epoch seconds plus ``*_iso`` fields)."""
    r = connect(cfg, name="status")
    try:
        job = read_model(r, cfg).job(job_id)
    finally:
        r.close()
    if job is None:
        print(f"error: no job {job_id!r} (unknown, or its record expired: RESULT_TTL after it was done)",
              file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(job, separators=(",", ":"), default=str))
        return 0
    rows = [("id", job["id"]), ("name", job["name"]), ("queue", job["queue"]), ("status", job["status"]),
            ("attempts", job["attempts"]), ("enqueued_at", job["enqueued_at_iso"]),
            ("started_at", job["started_at_iso"]), ("ended_at", job["ended_at_iso"]),
            ("waited", None if job["waited"] is None else duration(job["waited"])),
            ("ran", None if job["ran"] is None else duration(job["ran"])), ("worker", job["worker"])]
    if job.get("payload_found"):
        rows.append(("args", json.dumps(job.get("args"))))
        if job.get("kwargs"):
            rows.append(("kwargs", json.dumps(job.get("kwargs"))))
    if job["status"] == "done":
        rows.append(("result", json.dumps(job["result"])))
    if job.get("warning"):
        rows.append(("warning", job["warning"]))
    err = job.get("error")
    if err:
        rows += [("error", f"{err.get('type')}: {err.get('message')}")]
    for k, v in rows:
        print(f"{k:<12} {'-' if v is None else v}")
    if err and err.get("traceback"):
        print(err["traceback"].rstrip())
    return 0
