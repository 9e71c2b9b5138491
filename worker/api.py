"""The read model (Sidekiq's ``api.rb`` idea): everything ``status``, ``job``, ``failed``, ``/metrics`` and the web
dashboard show is read here, once, so the CLI and the page can never disagree. The renderers only format.

Every call costs a bounded number of Redis round trips whatever the data size (pipelines and read-only scripts):

==================  ======  ==============================================================================
call                trips   what
==================  ======  ==============================================================================
overview()          3       housekeeping script (trim FAILED_TTL, sample the minute); sets+counters; per-
                            queue LLEN/LINDEX + per-worker HGETALL + schedules + the hour's minute samples
queue(name, page)   1       LLEN + LRANGE of one page only (never the whole list) + pause flag
job(id)             2-3     status record + failed record + worker hashes; a queued job's payload: 1 script
failed(filters)     1-2     trim script, then one read-only script that filters server-side, returns a page
scheduled(page)     1       ZCARD + ZRANGE of one page
==================  ======  ==============================================================================

Every reader tolerates junk (records written by foreign producers, wrong-typed fields, non-JSON): it shows what
it can and lists what it skipped in a ``skipped`` entry (issue 27 item 9), never a traceback.

``FAILED_TTL`` is applied on read here (and by every worker's housekeeping, see :func:`housekeep`), not only when
a new failure arrives (issue 27 item 8).
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any, Optional

from .keys import Keys
from .lua import HOUSEKEEP, WAKE, Registry, calls  # noqa: F401  (HOUSEKEEP, WAKE: in __all__)

SCHEMA = 1
MINUTES = 60            # the throughput chart's span
SAMPLE_TTL_S = 2 * 3600  # a minute sample expires after two hours: at most ~120 small keys, whatever happens
TRIM_BATCH = 1000       # failed records trimmed per housekeeping call (bounded work per call)


# --- small, junk-tolerant conversions -------------------------------------------------------------------------

def _num(value, kind=float):
    """``kind(value)`` or None: worker hashes and payloads are written by other processes and may be partial."""
    try:
        out = kind(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return None if out != out or out in (float("inf"), float("-inf")) else out


def _str(value) -> Optional[str]:
    """A field shown as text: strings as they are, numbers as text, anything else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _loads(raw) -> Any:
    try:
        return json.loads(raw) if raw else None
    except (ValueError, TypeError, RecursionError):
        return None


def iso(seconds) -> Optional[str]:
    """Unix seconds as an ISO 8601 UTC time with milliseconds (``2026-12-06T18:12:50.123Z``), or None."""
    s = _num(seconds)
    if s is None:
        return None
    try:
        return datetime.fromtimestamp(s, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    except (OverflowError, OSError, ValueError):
        return None


def duration(seconds) -> str:
    """A compact, space-free duration: 4.2s, 3m05s, 2h01m, 3d04h; ``?`` when unknown."""
    s = _num(seconds)
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
    doc = _loads(head)
    at = _num(doc.get("enqueued_at")) if isinstance(doc, dict) else None
    if at is None:
        return None  # anyone can push anything to a queue: an unreadable head has an unknown latency
    return round(max(0.0, now - at), 3)  # the producer's clock may run ahead of Redis's


def summary(raw, now: Optional[float] = None) -> dict:
    """One waiting/scheduled payload as shown in a list: id, name, queue, args, kwargs, enqueued_at, attempts;
    ``junk`` True (and the raw text kept, shortened) when it is not a job object."""
    doc = _loads(raw)
    if not isinstance(doc, dict):
        text = raw if isinstance(raw, str) else repr(raw)
        return {"id": None, "name": None, "queue": None, "args": None, "kwargs": None, "enqueued_at": None,
                "attempts": None, "junk": True, "raw": text[:200]}
    return {"id": _str(doc.get("id")), "name": _str(doc.get("name")), "queue": _str(doc.get("queue")),
            "args": doc.get("args"), "kwargs": doc.get("kwargs"), "enqueued_at": _num(doc.get("enqueued_at")),
            "attempts": _num(doc.get("attempts"), int), "junk": False}


# --- workers ------------------------------------------------------------------------------------------------

def _slot_job(raw, started, now_ms: float, skipped: list, where: str):
    if not raw:
        return None
    doc = _loads(raw)
    if not isinstance(doc, dict):
        skipped.append(f"{where}: unreadable job payload")
        doc = {}
    start = _num(started)
    return {"id": _str(doc.get("id")), "name": _str(doc.get("name")), "queue": _str(doc.get("queue")),
            "running_for": None if start is None else round(max(0.0, now_ms - start) / 1000.0, 3)}


def _worker(name: str, score: float, info: dict, now_ms: float, default_ttl: float, skipped: list) -> dict:
    """One worker's entry. Its score in P:workers is its own deadline (beat + its TTL, hash field ``ttl``); workers
    of an older version wrote their last beat there instead and have no ``ttl``."""
    ttl, seen = _num(info.get("ttl")), _num(info.get("seen"))
    if ttl is None:
        seen, dead = score, now_ms - score > default_ttl * 1000
    else:
        seen, dead = (seen if seen is not None else score - ttl), score < now_ms
    state = "dead" if dead else (info.get("state") or "unknown")  # recovery will requeue its jobs
    slots = []
    for field, raw in info.items():
        if field.startswith("job:"):
            n = field[4:]
            slot = _num(n, int)
            if slot is None:
                skipped.append(f"worker {name}: field {field!r} is not a slot")
            slots.append({"slot": slot, "job": _slot_job(raw, info.get(f"started:{n}"), now_ms, skipped,
                                                         f"worker {name} slot {n}"),
                          "checkpoint": _loads(info.get(f"ckpt:{n}"))})
    if info.get("job"):  # an older worker's single job
        slots.append({"slot": 0, "job": _slot_job(info["job"], info.get("job_started"), now_ms, skipped,
                                                  f"worker {name}"), "checkpoint": None})
    slots.sort(key=lambda s: s["slot"] if s["slot"] is not None else -1)
    return {
        "name": name, "dyno": info.get("dyno") or None, "host": info.get("host") or None,
        "pid": _num(info.get("pid"), int), "queues": [q for q in (info.get("queues") or "").split(",") if q],
        "started": _num(info.get("started")), "state": state, "concurrency": _num(info.get("concurrency"), int) or 1,
        "job": slots[0]["job"] if slots else None, "slots": slots,
        "heartbeat_age": round(max(0.0, now_ms - (seen or 0)) / 1000.0, 3)}


def _schedules(names, infos) -> list:
    out = []
    for name, h in zip(names, infos):
        if not h:
            continue  # expired: no worker has had this schedule for a while

        def sec(field):
            v = _num(h.get(field))
            return None if v is None else v / 1000
        out.append({"name": name, "spec": h.get("spec"), "queue": h.get("queue"), "last": sec("last"),
                    "next": sec("next"), "skipped": sec("skipped"), "skip_reason": h.get("reason") or None})
    return sorted(out, key=lambda s: s["name"])


# --- the read model -----------------------------------------------------------------------------------------

class API:
    """Reads (and the few actions the dashboard offers) through one redis-py client ``r`` (decode_responses)."""

    def __init__(self, r, cfg):
        self.r, self.cfg = r, cfg
        self.k = Keys(cfg.key_prefix)
        self.scripts = Registry(r)

    def housekeep(self) -> dict:
        """Trim failed records past ``FAILED_TTL`` and sample this minute's counters (one script call).
        Returns ``{"time", "trimmed", "wrong_typed": [keys]}``."""
        return calls.parse_housekeep(self.scripts.run(
            calls.housekeep(self.k, int(self.cfg.failed_ttl * 1000), TRIM_BATCH, SAMPLE_TTL_S)))

    def overview(self) -> dict:
        """The ``status --json`` document (schema 1, see status.py) plus ``throughput`` and ``skipped``."""
        k, cfg, skipped = self.k, self.cfg, []
        hk = self.housekeep()
        if hk["wrong_typed"]:
            skipped.append("wrong-typed keys: " + ", ".join(hk["wrong_typed"]))
        with self.r.pipeline(transaction=False) as p:
            p.time().smembers(k.queues).smembers(k.paused).zrange(k.workers, 0, -1, withscores=True)
            p.zcard(k.failed).zcard(k.scheduled).get(k.processed).get(k.failed_count)
            p.zrange(k.schedules, 0, -1)
            res = p.execute(raise_on_error=False)
        res = [self._ok(v, what, skipped) for v, what in zip(res, (
            None, k.queues, k.paused, k.workers, k.failed, k.scheduled, k.processed, k.failed_count,
            k.schedules))]
        (sec, usec), known, paused, workers, n_failed, n_scheduled, processed, failed_total, sched = res
        known, paused, workers, sched = known or set(), paused or set(), workers or [], sched or []
        now = int(sec) + int(usec) / 1e6
        now_ms = now * 1000.0
        names = sorted(set(known) | {q for q in cfg.queues if q != "*"} | (set(paused) - {"*"}))
        minute = int(now // 60)
        with self.r.pipeline(transaction=False) as p:
            for q in names:
                p.llen(k.queue(q)).lindex(k.queue(q), 0)
            for w, _ in workers:
                p.hgetall(k.worker(w))
            for n in sched:
                p.hgetall(k.sched(n))
            p.mget([k.stat_minute(m) for m in range(minute - MINUTES, minute + 1)])
            res = p.execute(raise_on_error=False)
        queues = []
        for i, q in enumerate(names):
            depth, head = res[2 * i], res[2 * i + 1]
            if isinstance(depth, Exception):
                skipped.append(f"queue {q}: {k.queue(q)} is not a list")
                depth, head = None, None
            queues.append({"name": q, "depth": depth, "latency": latency(head, now) if depth is not None else None,
                           "paused": q in paused or "*" in paused})
        at = 2 * len(names)
        out_workers = []
        for (w, score), info in zip(workers, res[at:at + len(workers)]):
            if isinstance(info, Exception):
                skipped.append(f"worker {w}: {k.worker(w)} is not a hash")
                info = {}
            out_workers.append(_worker(w, score, info, now_ms, cfg.heartbeat_ttl, skipped))
        at += len(workers)
        infos = [i if isinstance(i, dict) else {} for i in res[at:at + len(sched)]]
        samples = res[-1] if isinstance(res[-1], list) else []
        return {"schema": SCHEMA, "time": round(now, 6), "paused": sorted(paused), "queues": queues,
                "workers": sorted(out_workers, key=lambda w: w["name"]), "failed": n_failed or 0,
                "scheduled": n_scheduled or 0,
                "totals": {"processed": _num(processed, int) or 0, "failed": _num(failed_total, int) or 0},
                "schedules": _schedules(sched, infos),
                "throughput": self._throughput(samples, minute, processed, failed_total),
                "skipped": skipped}

    @staticmethod
    def _ok(value, what, skipped):
        if isinstance(value, Exception):
            skipped.append(f"{what}: {value}")
            return None
        return value

    @staticmethod
    def _throughput(samples: list, minute: int, processed, failed) -> list:
        """``[{"minute": unix_seconds, "processed": n, "failed": n}]`` per minute of the last hour, from the
        differences of consecutive minute samples (the current minute against the live counters); a minute with no
        sample on either side is None (nobody was sampling then)."""
        vals = []
        for raw in samples:
            parts = (raw or "").split()
            vals.append((_num(parts[0], int), _num(parts[1], int)) if len(parts) == 2 else None)
        vals.append((_num(processed, int) or 0, _num(failed, int) or 0))  # "now" closes the current minute
        out = []
        for i in range(1, len(vals)):
            a, b = vals[i - 1], vals[i]
            m = minute - MINUTES + i - 1
            if a is None or b is None or None in a or None in b:
                out.append({"minute": m * 60, "processed": None, "failed": None})
            else:
                out.append({"minute": m * 60, "processed": max(0, b[0] - a[0]), "failed": max(0, b[1] - a[1])})
        return out

    def backlog(self, queues) -> int:
        """Jobs waiting for a worker on ``queues`` (``("*",)``: every known queue), due scheduled jobs included."""
        names = [q for q in queues if q != "*"]
        return int(self.scripts.run(calls.backlog(self.k, "*" in queues, names)))

    # --- one queue ---

    def queue(self, name: str, page: int = 1, per_page: int = 50) -> dict:
        """One page of queue ``name`` (head first): LLEN + LRANGE of that page only, one round trip."""
        k = self.k
        page, per_page = max(1, int(page)), max(1, min(500, int(per_page)))
        start = (page - 1) * per_page
        with self.r.pipeline(transaction=False) as p:
            p.time().llen(k.queue(name)).lrange(k.queue(name), start, start + per_page - 1).smembers(k.paused)
            p.lindex(k.queue(name), 0)
            (sec, usec), depth, raws, paused, head = p.execute(raise_on_error=False)
        skipped = []
        if isinstance(depth, Exception):
            skipped.append(f"{k.queue(name)} is not a list")
            depth, raws, head = 0, [], None
        paused = paused if isinstance(paused, set) else set()
        now = int(sec) + int(usec) / 1e6
        jobs = [dict(summary(raw), position=start + i, raw_payload=raw) for i, raw in enumerate(raws)]
        skipped += [f"position {j['position']}: not a job object" for j in jobs if j["junk"]]
        return {"name": name, "depth": depth, "latency": latency(head, now), "paused": name in paused or "*" in paused,
                "page": page, "per_page": per_page, "pages": max(1, -(-depth // per_page)), "jobs": jobs,
                "skipped": skipped, "time": now}

    # --- one job ---

    def job(self, job_id: str) -> Optional[dict]:
        """Everything known about one job, or None: its status record, its failure (error, traceback, history), the
        worker and slot running it, its payload (arguments, checkpoint) when it can be found."""
        from . import results
        k = self.k
        job = results.fetch(self.r, k, job_id)
        with self.r.pipeline(transaction=False) as p:
            p.time().hget(k.failed_data, job_id)
            (sec, usec), failure = p.execute(raise_on_error=False)
        now = int(sec) + int(usec) / 1e6
        rec = _loads(failure) if isinstance(failure, str) else None
        rec = rec if isinstance(rec, dict) else None
        if job is None and rec is None:
            return None
        doc = job.to_dict() if job is not None else {
            "id": job_id, "name": _str(rec.get("name")), "queue": _str(rec.get("queue")), "status": "failed",
            "result": None, "attempts": _num(rec.get("attempts"), int) or 0, "enqueued_at": None,
            "started_at": None, "ended_at": _num(rec.get("failed_at")), "worker": _str(rec.get("worker")),
            "error": None}
        payload = None
        if rec is None and doc.get("error") and not any(doc["error"].values()):
            doc["error"] = None  # its failed record is gone (retried, deleted or trimmed): nothing to show
        if rec is not None:
            payload = rec.get("payload")
            doc["error"] = {f: _str(rec.get(f)) for f in ("type", "message", "traceback", "cause")}
            doc["history"] = rec.get("history") if isinstance(rec.get("history"), list) else []
        if payload is None and doc["status"] == "running":
            payload = self._running_payload(job_id)
        if payload is None and doc["status"] == "queued" and doc.get("queue"):
            payload = self.scripts.run(calls.find_queued(k, doc["queue"], job_id))
            payload = payload or None
        body = _loads(payload)
        body = body if isinstance(body, dict) else {}
        doc.update(args=body.get("args"), kwargs=body.get("kwargs"), checkpoint=body.get("checkpoint"),
                   errors=body.get("errors") if isinstance(body.get("errors"), list) else [],
                   payload_found=bool(body), time=now)
        for f in ("enqueued_at", "started_at", "ended_at"):
            doc[f + "_iso"] = iso(doc.get(f))
        end = doc.get("ended_at") or (now if doc["status"] == "running" else None)
        doc["waited"] = _diff(doc.get("started_at"), doc.get("enqueued_at"))
        doc["ran"] = _diff(end, doc.get("started_at"))
        return doc

    def _running_payload(self, job_id: str):
        needle = f'{{"id":"{job_id}"'
        workers = self.r.zrange(self.k.workers, 0, -1)
        with self.r.pipeline(transaction=False) as p:
            for w in workers:
                p.hgetall(self.k.worker(w))
            infos = p.execute(raise_on_error=False) if workers else []
        for info in infos:
            if isinstance(info, dict):
                for field, value in info.items():
                    if field.startswith("job:") and value.startswith(needle):
                        return value
        return None

    # --- failed registry ---

    def failed(self, name: str = "", error: str = "", page: int = 1, per_page: int = 50) -> dict:
        """One page of the failed registry, newest first, filtered by job name and error type (server-side, one
        read-only script), after trimming what is past ``FAILED_TTL``. ``skipped``: junk records not shown."""
        k = self.k
        self.housekeep()
        page, per_page = max(1, int(page)), max(0, min(1000, int(per_page)))
        total, matched, skipped, lists, raws = calls.parse_failed_page(self.scripts.run(
            calls.failed_page(k, name or "", error or "", (page - 1) * per_page, per_page)))
        names, types, skipped_ids = (_loads(x) or {} for x in lists)
        jobs = []
        for raw in raws:
            rec = _loads(raw)
            if isinstance(rec, dict):
                jobs.append(rec)
        return {"count": total, "matched": matched, "page": page, "per_page": per_page,
                "pages": max(1, -(-matched // per_page)) if per_page else 1, "jobs": jobs,
                "names": {str(n): c for n, c in (names.items() if isinstance(names, dict) else [])},
                "types": {str(n): c for n, c in (types.items() if isinstance(types, dict) else [])},
                "skipped": [f"failed record {i!r}: not a JSON object" for i in (skipped_ids or [])]
                + ([f"... and {skipped - len(skipped_ids)} more"] if skipped > len(skipped_ids or []) else [])}

    def failed_record(self, job_id: str) -> Optional[dict]:
        """One failed record, or None (unknown or not a JSON object)."""
        rec = _loads(self.r.hget(self.k.failed_data, job_id))
        return rec if isinstance(rec, dict) else None

    def failed_matching(self, name: str = "", error: str = "") -> list:
        """Ids of every failed record matching the filters (for "retry/delete all matching")."""
        return list(self.scripts.run(calls.failed_match(self.k, name, error)))

    # --- scheduled and retries ---

    def scheduled(self, page: int = 1, per_page: int = 50) -> dict:
        """One page of P:scheduled (soonest first): ZCARD + ZRANGE of that page, one round trip."""
        k = self.k
        page, per_page = max(1, int(page)), max(1, min(500, int(per_page)))
        start = (page - 1) * per_page
        with self.r.pipeline(transaction=False) as p:
            p.time().zcard(k.scheduled).zrange(k.scheduled, start, start + per_page - 1, withscores=True)
            (sec, usec), total, rows = p.execute(raise_on_error=False)
        skipped = []
        if isinstance(total, Exception):
            skipped.append(f"{k.scheduled} is not a sorted set")
            total, rows = 0, []
        now = int(sec) + int(usec) / 1e6
        jobs = []
        for raw, score in rows:
            s = summary(raw)
            s.update(due=score / 1000.0, due_in=round(score / 1000.0 - now, 3), raw_payload=raw,
                     retry=bool((s.get("attempts") or 0) > 0))
            jobs.append(s)
        return {"count": total, "page": page, "per_page": per_page, "pages": max(1, -(-total // per_page)),
                "jobs": jobs, "skipped": skipped, "time": now}


class Housekeeper:
    """The workers' side of :data:`HOUSEKEEP`: every ``HOUSEKEEP_EVERY`` seconds each worker trims failed records
    past ``FAILED_TTL`` and samples the minute's counters for the throughput chart, so both hold with no dashboard
    open and no extra process. Costs one comparison when not due, one script call when due."""

    EVERY = 10.0

    def __init__(self, cfg):
        self.cfg = cfg
        self._next = float("-inf")
        self._api = None

    def maybe_run(self, broker, log, now_monotonic: float, worker: str = "") -> Optional[dict]:
        if now_monotonic < self._next:
            return None
        self._next = now_monotonic + self.EVERY
        if self._api is None or self._api.r is not broker.r:
            self._api = API(broker.r, self.cfg)
        res = self._api.housekeep()
        if res["trimmed"]:
            log.info("failed.trimmed", count=res["trimmed"], failed_ttl=f"{self.cfg.failed_ttl:g}s")
        if res["wrong_typed"]:
            log.warning("housekeep.wrong_type", keys=",".join(res["wrong_typed"]))
        return res


def _diff(a, b) -> Optional[float]:
    a, b = _num(a), _num(b)
    return None if a is None or b is None else round(max(0.0, a - b), 3)


def connect_api(cfg, name: str = "status") -> API:
    from .client import connect
    return API(connect(cfg, name=name), cfg)


__all__ = ["API", "HOUSEKEEP", "iso", "duration", "latency", "summary", "WAKE"]
