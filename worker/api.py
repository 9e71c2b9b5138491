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

Split by concern: this module reads (one method per page), :mod:`worker.api_overview` builds the overview
document, :mod:`worker.api_values` holds the junk-tolerant conversions and display formats, :mod:`worker.lua`
the scripts (``worker/lua/*.lua``; their arguments and replies: :mod:`worker.lua.calls`).

``FAILED_TTL`` is applied on read here (and by every worker's housekeeping, see :func:`housekeep`), not only when
a new failure arrives (issue 27 item 8).
"""
from __future__ import annotations

from typing import Optional

from . import api_overview
from .api_overview import SCHEMA
from .api_values import as_num, as_str, duration, elapsed, iso, latency, parse_json, summary
from .keys import Keys
from .lua import HOUSEKEEP, WAKE, Registry, calls  # noqa: F401  (HOUSEKEEP, WAKE: in __all__)

SAMPLE_TTL_S = 2 * 3600  # a minute sample expires after two hours: at most ~120 small keys, whatever happens
TRIM_BATCH = 1000       # failed records trimmed per housekeeping call (bounded work per call)


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
        """The ``status --json`` document (schema 1, see status.py) plus ``throughput`` and ``skipped``
        (worker/api_overview.py)."""
        return api_overview.overview(self)

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
        rec = parse_json(failure) if isinstance(failure, str) else None
        rec = rec if isinstance(rec, dict) else None
        if job is not None and job.status != "failed":
            rec = None  # an earlier run's failure under an id used again (job_id=): the registry keeps it
        if job is None and rec is None:
            return None
        doc = job.to_dict() if job is not None else {
            "id": job_id, "name": as_str(rec.get("name")), "queue": as_str(rec.get("queue")), "status": "failed",
            "result": None, "attempts": as_num(rec.get("attempts"), int) or 0, "enqueued_at": None,
            "started_at": None, "ended_at": as_num(rec.get("failed_at")), "worker": as_str(rec.get("worker")),
            "error": None}
        payload = None
        if rec is None and doc.get("error") and not any(doc["error"].values()):
            doc["error"] = None  # its failed record is gone (retried, deleted or trimmed): nothing to show
        if rec is not None:
            payload = rec.get("payload")
            doc["error"] = {f: as_str(rec.get(f)) for f in ("type", "message", "traceback", "cause")}
            doc["history"] = rec.get("history") if isinstance(rec.get("history"), list) else []
        if payload is None and doc["status"] == "running":
            payload = self._running_payload(job_id)
        if payload is None and doc["status"] == "queued" and doc.get("queue"):
            payload = self.scripts.run(calls.find_queued(k, doc["queue"], job_id, as_str(doc.get("name")) or None))
            payload = payload or None
        body = parse_json(payload)
        body = body if isinstance(body, dict) else {}
        doc.update(args=body.get("args"), kwargs=body.get("kwargs"), checkpoint=body.get("checkpoint"),
                   errors=body.get("errors") if isinstance(body.get("errors"), list) else [],
                   payload_found=bool(body), time=now)
        for f in ("enqueued_at", "started_at", "ended_at"):
            doc[f + "_iso"] = iso(doc.get(f))
        end = doc.get("ended_at") or (now if doc["status"] == "running" else None)
        doc["waited"] = elapsed(doc.get("started_at"), doc.get("enqueued_at"))
        doc["ran"] = elapsed(end, doc.get("started_at"))
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
        names, types, skipped_ids = (parse_json(x) or {} for x in lists)
        jobs = []
        for raw in raws:
            rec = parse_json(raw)
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
        rec = parse_json(self.r.hget(self.k.failed_data, job_id))
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


__all__ = ["API", "HOUSEKEEP", "SCHEMA", "iso", "duration", "latency", "summary", "WAKE"]
