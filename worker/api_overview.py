"""The read model's overview (worker/api.py ``API.overview``): the ``status --json`` document (schema 1, see
status.py) plus the dashboard's ``throughput`` chart and ``skipped``. Three round trips whatever the data size: the
housekeeping script; sets and counters; per-queue LLEN/LINDEX + per-worker HGETALL + schedules + the hour's minute
samples. A wrong-typed key is named in ``skipped``, never a traceback (issue 27 item 9)."""
from __future__ import annotations

from .api_values import as_num, as_str, latency, parse_json

SCHEMA = 1
MINUTES = 60            # the throughput chart's span


def overview(api) -> dict:
    """The overview document read through ``api`` (a :class:`worker.api.API`)."""
    k, cfg, skipped = api.k, api.cfg, []
    hk = api.housekeep()
    if hk["wrong_typed"]:
        skipped.append("wrong-typed keys: " + ", ".join(hk["wrong_typed"]))
    (sec, usec), known, paused, workers, n_failed, n_scheduled, processed, failed_total, sched = _counts(api, skipped)
    known, paused, workers, sched = known or set(), paused or set(), workers or [], sched or []
    now = int(sec) + int(usec) / 1e6
    names = sorted(set(known) | {q for q in cfg.queues if q != "*"} | (set(paused) - {"*"}))
    minute = int(now // 60)
    res = _details(api, names, workers, sched, minute)
    at = 2 * len(names)
    infos = [i if isinstance(i, dict) else {} for i in res[at + len(workers):at + len(workers) + len(sched)]]
    samples = res[-1] if isinstance(res[-1], list) else []
    return {"schema": SCHEMA, "time": round(now, 6), "paused": sorted(paused),
            "queues": _queues(k, names, res, paused, now, skipped),
            "workers": _workers(api, workers, res[at:at + len(workers)], now * 1000.0, skipped),
            "failed": n_failed or 0, "scheduled": n_scheduled or 0,
            "totals": {"processed": as_num(processed, int) or 0, "failed": as_num(failed_total, int) or 0},
            "schedules": _schedules(sched, infos),
            "throughput": _throughput(samples, minute, processed, failed_total),
            "skipped": skipped}


def _counts(api, skipped: list) -> list:
    """Round trip 2: TIME, the sets and the counters (None, named in ``skipped``, for a wrong-typed key)."""
    k = api.k
    with api.r.pipeline(transaction=False) as p:
        p.time().smembers(k.queues).smembers(k.paused).zrange(k.workers, 0, -1, withscores=True)
        p.zcard(k.failed).zcard(k.scheduled).get(k.processed).get(k.failed_count)
        p.zrange(k.schedules, 0, -1)
        res = p.execute(raise_on_error=False)
    return [_ok(v, what, skipped) for v, what in zip(res, (
        None, k.queues, k.paused, k.workers, k.failed, k.scheduled, k.processed, k.failed_count,
        k.schedules))]


def _details(api, names, workers, sched, minute: int) -> list:
    """Round trip 3: per queue LLEN + LINDEX 0, per worker HGETALL, per schedule HGETALL, the minute samples."""
    k = api.k
    with api.r.pipeline(transaction=False) as p:
        for q in names:
            p.llen(k.queue(q)).lindex(k.queue(q), 0)
        for w, _ in workers:
            p.hgetall(k.worker(w))
        for n in sched:
            p.hgetall(k.sched(n))
        p.mget([k.stat_minute(m) for m in range(minute - MINUTES, minute + 1)])
        return p.execute(raise_on_error=False)


def _ok(value, what, skipped):
    if isinstance(value, Exception):
        skipped.append(f"{what}: {value}")
        return None
    return value


def _queues(k, names, res, paused, now: float, skipped: list) -> list:
    queues = []
    for i, q in enumerate(names):
        depth, head = res[2 * i], res[2 * i + 1]
        if isinstance(depth, Exception):
            skipped.append(f"queue {q}: {k.queue(q)} is not a list")
            depth, head = None, None
        queues.append({"name": q, "depth": depth, "latency": latency(head, now) if depth is not None else None,
                       "paused": q in paused or "*" in paused})
    return queues


def _workers(api, workers, infos, now_ms: float, skipped: list) -> list:
    out = []
    for (w, score), info in zip(workers, infos):
        if isinstance(info, Exception):
            skipped.append(f"worker {w}: {api.k.worker(w)} is not a hash")
            info = {}
        out.append(_worker(w, score, info, now_ms, api.cfg.heartbeat_ttl, skipped))
    return sorted(out, key=lambda w: w["name"])


def _slot_job(raw, started, now_ms: float, skipped: list, where: str):
    if not raw:
        return None
    doc = parse_json(raw)
    if not isinstance(doc, dict):
        skipped.append(f"{where}: unreadable job payload")
        doc = {}
    start = as_num(started)
    return {"id": as_str(doc.get("id")), "name": as_str(doc.get("name")), "queue": as_str(doc.get("queue")),
            "running_for": None if start is None else round(max(0.0, now_ms - start) / 1000.0, 3)}


def _worker(name: str, score: float, info: dict, now_ms: float, default_ttl: float, skipped: list) -> dict:
    """One worker's entry. Its score in P:workers is its own deadline (beat + its TTL, hash field ``ttl``); workers
    of an older version wrote their last beat there instead and have no ``ttl``."""
    ttl, seen = as_num(info.get("ttl")), as_num(info.get("seen"))
    if ttl is None:
        seen, dead = score, now_ms - score > default_ttl * 1000
    else:
        seen, dead = (seen if seen is not None else score - ttl), score < now_ms
    state = "dead" if dead else (info.get("state") or "unknown")  # recovery will requeue its jobs
    slots = _slots(name, info, now_ms, skipped)
    return {
        "name": name, "dyno": info.get("dyno") or None, "host": info.get("host") or None,
        "pid": as_num(info.get("pid"), int), "queues": [q for q in (info.get("queues") or "").split(",") if q],
        "started": as_num(info.get("started")), "state": state,
        "concurrency": as_num(info.get("concurrency"), int) or 1,
        "job": slots[0]["job"] if slots else None, "slots": slots,
        "heartbeat_age": round(max(0.0, now_ms - (seen or 0)) / 1000.0, 3)}


def _slots(name: str, info: dict, now_ms: float, skipped: list) -> list:
    slots = []
    for field, raw in info.items():
        if field.startswith("job:"):
            n = field[4:]
            slot = as_num(n, int)
            if slot is None:
                skipped.append(f"worker {name}: field {field!r} is not a slot")
            slots.append({"slot": slot, "job": _slot_job(raw, info.get(f"started:{n}"), now_ms, skipped,
                                                         f"worker {name} slot {n}"),
                          "checkpoint": parse_json(info.get(f"ckpt:{n}"))})
    if info.get("job"):  # an older worker's single job
        slots.append({"slot": 0, "job": _slot_job(info["job"], info.get("job_started"), now_ms, skipped,
                                                  f"worker {name}"), "checkpoint": None})
    slots.sort(key=lambda s: s["slot"] if s["slot"] is not None else -1)
    return slots


def _schedules(names, infos) -> list:
    out = []
    for name, h in zip(names, infos):
        if not h:
            continue  # expired: no worker has had this schedule for a while

        def sec(field):
            v = as_num(h.get(field))
            return None if v is None else v / 1000
        out.append({"name": name, "spec": h.get("spec"), "queue": h.get("queue"), "last": sec("last"),
                    "next": sec("next"), "skipped": sec("skipped"), "skip_reason": h.get("reason") or None})
    return sorted(out, key=lambda s: s["name"])


def _throughput(samples: list, minute: int, processed, failed) -> list:
    """``[{"minute": unix_seconds, "processed": n, "failed": n}]`` per minute of the last hour, from the
    differences of consecutive minute samples (the current minute against the live counters); a minute with no
    sample on either side is None (nobody was sampling then)."""
    vals = []
    for raw in samples:
        parts = (raw or "").split()
        vals.append((as_num(parts[0], int), as_num(parts[1], int)) if len(parts) == 2 else None)
    vals.append((as_num(processed, int) or 0, as_num(failed, int) or 0))  # "now" closes the current minute
    out = []
    for i in range(1, len(vals)):
        a, b = vals[i - 1], vals[i]
        m = minute - MINUTES + i - 1
        if a is None or b is None or None in a or None in b:
            out.append({"minute": m * 60, "processed": None, "failed": None})
        else:
            out.append({"minute": m * 60, "processed": max(0, b[0] - a[0]), "failed": max(0, b[1] - a[1])})
    return out
