"""Periodic jobs: ``@job(every=300)`` or ``@job(cron="*/5 * * * *")``, enqueued by the workers themselves.

No leader and no clock process. Every worker that registered the job (``JOB_MODULES``) computes the schedule's
current tick on Redis's clock and, when a tick is due, runs ``worker/lua/schedule.lua``: one atomic call that
claims the tick (``P:sched:<name>`` field ``tick``, only ever raised) and, in the same call, pushes the job and
rings the queue's wake list. However many workers make that call for the same tick, one of them enqueues it.

* Ticks. ``every=N``: multiples of N seconds since the Unix epoch (``every=300`` fires at :00, :05, ...).
  ``cron=``: a standard 5-field expression, in UTC unless ``tz=`` names a zone (parsed by the optional ``cronsim``
  package: ``pip install cronsim``, or the ``cron`` extra of this package).
* Missed ticks. Only the latest tick (the last one at or before now) is ever a candidate, and only while it is
  younger than ``misfire_grace`` (default: one interval). After all workers were down, the tick that fell while they
  were away is enqueued once when the first one comes back, if it is still that young; older ones are skipped and
  never caught up in a burst.
* Pause. While the job's queue (or ``*``) is paused, its ticks are claimed and skipped, not enqueued later.
* Unique per schedule (issue 25). A tick is claimed and skipped (``schedule.skipped reason=overlap previous=<id>``)
  while the previous tick's run has not ended: its status record (written by the script with the run) says queued
  (also while it runs: the claim writes none, and after a put-back or recovery) or scheduled (a retry). A slow job
  therefore never piles up ticks. ``@job(every=..., unique=False)`` restores overlapping ticks.
* The worker checks when the earliest next tick is due (and at least once a minute), never more than a few times a
  second; the check costs one script call, on the worker's own command connection.

The schedule definition travels from the fork server (which imports the app) to the worker in ``jobs.meta()``;
:func:`check` validates it there, so a bad schedule stops the worker at start (exit 2, one line).
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Optional

from .config import ConfigError
from .keys import Keys
from .lua import calls

MAX_CHECK = 60.0      # seconds between checks at most (keeps the worker's estimate of Redis's clock fresh)
MIN_CHECK = 0.05      # seconds between checks at least (a clock that disagrees with Redis's cannot make us spin)
LATE_BY = 0.002       # check this long after a tick, so Redis's clock has surely reached it
CRON_HINT = "cron= schedules need the cronsim package: pip install cronsim (or heroku-fork-worker[cron])"


def declare(every, cron, tz, misfire_grace, schedule_args, schedule_kwargs, unique=True) -> Optional[dict]:
    """What ``@job`` stores about a schedule (checks only what needs no library; :func:`check` does the rest).
    ``unique``: a tick is skipped while the previous tick's run has not ended (``@job(unique=False)``: not)."""
    if every is None and cron is None:
        if schedule_args is not None or schedule_kwargs is not None or misfire_grace is not None or tz is not None:
            raise ValueError("schedule_args, schedule_kwargs, misfire_grace and tz need every= or cron=")
        return None
    if every is not None and cron is not None:
        raise ValueError("give every= or cron=, not both (register a second name for a second schedule)")
    return {"every": every, "cron": cron, "tz": tz, "misfire_grace": misfire_grace,
            "args": list(schedule_args or ()), "kwargs": dict(schedule_kwargs or {}), "unique": bool(unique)}


@dataclass(frozen=True)
class Schedule:
    """One job's schedule, ready to compute ticks (unix milliseconds)."""

    name: str          # the job's registered name (one schedule per job)
    queue: str
    spec: str          # shown by status: "every 300s" or "cron */5 * * * * UTC"
    every_ms: int      # 0 for cron
    cron: Optional[str]
    zone: object       # tzinfo for cron
    grace_ms: Optional[int]
    args: list
    kwargs: dict
    unique: bool = True  # skip a tick while the previous tick's run is queued, scheduled (retry) or running

    def ticks(self, now_ms: int) -> tuple:
        """``(latest tick <= now_ms, next tick > now_ms)``, unix ms."""
        if self.every_ms:
            last = now_ms // self.every_ms * self.every_ms
            return last, last + self.every_ms
        from cronsim import CronSim
        now = datetime.fromtimestamp(now_ms / 1000, timezone.utc).astimezone(self.zone)
        # cronsim's reverse iteration is strictly before its start (a start with microseconds counts itself)
        last = next(CronSim(self.cron, now + timedelta(microseconds=1), reverse=True))
        nxt = next(CronSim(self.cron, now))
        return int(last.timestamp() * 1000), int(nxt.timestamp() * 1000)

    def grace(self, last_ms: int, next_ms: int) -> int:
        return self.grace_ms if self.grace_ms is not None else next_ms - last_ms

    def payload(self, tick_ms: int) -> tuple:
        """``(job id, payload JSON)`` of this schedule's job for ``tick_ms``: enqueued_at is the tick, so queue
        latency counts from it; ``schedule`` and ``tick`` say where the job came from."""
        job_id = uuid.uuid4().hex
        doc = {"id": job_id, "name": self.name, "queue": self.queue, "args": self.args, "kwargs": self.kwargs,
               "enqueued_at": tick_ms / 1000, "attempts": 0, "schedule": self.name, "tick": tick_ms / 1000}
        return job_id, json.dumps(doc, separators=(",", ":"), allow_nan=False)


def _zone(name, tz):
    if tz is None or tz in ("UTC", "utc"):
        return timezone.utc
    try:
        from zoneinfo import ZoneInfo
        return ZoneInfo(tz)
    except Exception:  # ZoneInfoNotFoundError, ValueError for odd strings
        raise ConfigError(f"job {name!r}: tz={tz!r} is not a known time zone (IANA name, e.g. 'Europe/Paris')") \
            from None


def build(name: str, queue: str, sched: dict) -> Schedule:
    """A :class:`Schedule` from what ``jobs.meta()`` carries. Raises :class:`ConfigError` with one line."""
    every, cron, tz, grace = sched.get("every"), sched.get("cron"), sched.get("tz"), sched.get("misfire_grace")
    where = f"job {name!r}"
    if grace is not None and (isinstance(grace, bool) or not isinstance(grace, (int, float))
                              or not math.isfinite(grace) or grace < 0):
        raise ConfigError(f"{where}: misfire_grace={grace!r} is not valid: expected seconds >= 0")
    if every is not None:
        if isinstance(every, bool) or not isinstance(every, (int, float)) or not math.isfinite(every) or every < 1:
            raise ConfigError(f"{where}: every={every!r} is not valid: expected a number of seconds >= 1")
        if tz is not None:
            raise ConfigError(f"{where}: tz= applies to cron= schedules only (every= counts from the Unix epoch)")
        every_ms, spec, zone = int(round(every * 1000)), f"every {every:g}s", timezone.utc
    else:
        if not isinstance(cron, str) or len(cron.split()) != 5:
            raise ConfigError(f"{where}: cron={cron!r} is not valid: expected 5 fields "
                              f"(minute hour day-of-month month day-of-week), e.g. '*/5 * * * *'")
        try:
            from cronsim import CronSim, CronSimError
        except ImportError:
            raise ConfigError(f"{where}: {CRON_HINT}") from None
        zone = _zone(name, tz)
        try:
            CronSim(cron, datetime.now(timezone.utc).astimezone(zone))
        except CronSimError as exc:
            raise ConfigError(f"{where}: cron={cron!r} is not valid: {exc}") from None
        every_ms, spec = 0, f"cron {' '.join(cron.split())} {tz or 'UTC'}"
    s = Schedule(name, queue, spec, every_ms, cron, zone, None if grace is None else int(grace * 1000),
                 list(sched.get("args") or []), dict(sched.get("kwargs") or {}), sched.get("unique") is not False)
    if not every_ms:
        s.ticks(int(time.time() * 1000))  # an expression that never matches (e.g. 30 Feb) fails here, not later
    return s


def check(spec) -> Optional[dict]:
    """Validate the schedule of a registered job (a ``jobs.JobSpec``) for ``jobs.meta()``: returns what travels to
    the worker, or None. Raises :class:`ConfigError` (one line) for anything the worker could not run."""
    sched = spec.schedule
    if sched is None:
        return None
    try:
        build(spec.name, spec.queue, sched)
    except ConfigError:
        raise
    except Exception as exc:  # cronsim may raise beyond CronSimError on odd input (e.g. StopIteration)
        raise ConfigError(f"job {spec.name!r}: schedule is not valid ({type(exc).__name__}: {exc})") from None
    try:
        json.dumps([sched["args"], sched["kwargs"]], allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"job {spec.name!r}: schedule_args/schedule_kwargs must be JSON ({exc})") from None
    try:
        spec.signature.bind(*sched["args"], **sched["kwargs"])
    except TypeError as exc:
        raise ConfigError(f"job {spec.name!r}: schedule_args/schedule_kwargs do not fit "
                          f"{spec.name}{spec.signature}: {exc}") from None
    return sched


class Ticker:
    """The worker's side: which schedules to check and when (``next_check``, monotonic seconds)."""

    def __init__(self, schedules: list, broker, log):
        self.schedules = schedules
        self.broker, self.log = broker, log
        self.offset = 0.0      # Redis's clock minus ours, seconds (learnt from every reply)
        self.next_check = 0.0  # monotonic
        self._ticks: dict = {}  # name -> (latest tick, next tick, job id, payload) last computed
        for s in schedules:
            log.info("schedule.registered", schedule=s.name, queue=s.queue, when=s.spec)

    @classmethod
    def from_meta(cls, meta: dict, broker, log) -> Optional["Ticker"]:
        """None when no registered job has a schedule (the worker then does nothing more per turn)."""
        cfg = getattr(broker, "cfg", None)  # QUEUE_GROUPS: only the periodic jobs whose queue is in this worker's group
        mine = dict(cfg.queue_groups).get(cfg.group) if cfg is not None and cfg.queue_groups else None
        schedules = [build(name, m["queue"], m["schedule"]) for name, m in sorted(meta.items())
                     if m.get("schedule") and (mine is None or m["queue"] in mine)]
        return cls(schedules, broker, log) if schedules else None

    def due(self) -> bool:
        return time.monotonic() >= self.next_check

    def run(self, retry: bool = True) -> None:
        """One script call for every schedule: claim the ticks that are due; log what happened."""
        k = self.broker.keys
        self.next_check = time.monotonic() + 1.0  # if this call fails: again in a second (or after the outage)
        now_ms = int((time.time() + self.offset) * 1000)
        rows, sent = [], []
        for s in self.schedules:
            last, nxt, job_id, payload = self._ticks.get(s.name, (1, 0, "", ""))
            if not last <= now_ms < nxt:  # cron's ticks cost ~0.1 ms to compute: only when the tick moved on
                last, nxt = s.ticks(now_ms)
                job_id, payload = s.payload(last)
                self._ticks[s.name] = (last, nxt, job_id, payload)
            grace = s.grace(last, nxt)
            ttl = 2 * max(grace, nxt - last) + 60_000
            rows.append((s.name, s.queue, last, nxt, grace, ttl, s.spec, payload, job_id, "1" if s.unique else ""))
            sent.append((s, last, job_id, nxt))
        sent_at = time.time()
        res = self.broker.run(calls.schedule(k, rows))
        redis_ms = int(res[0])
        self.offset = redis_ms / 1000 - (sent_at + time.time()) / 2
        skew = False
        for (s, tick, job_id, _), code in zip(sent, res[1:]):
            if code in ("taken", "skew"):
                skew = skew or code == "skew"
                continue
            at = datetime.fromtimestamp(tick / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
            if code == "enqueued":
                self.log.info("schedule.enqueued", schedule=s.name, job=job_id, queue=s.queue, tick=at)
            elif code in ("late", "paused"):
                self.log.info("schedule.skipped", schedule=s.name, queue=s.queue, tick=at, reason=code)
            elif code.startswith("overlap:"):  # unique per schedule: the previous tick's run has not ended
                self.log.info("schedule.skipped", schedule=s.name, queue=s.queue, tick=at, reason="overlap",
                              previous=code[len("overlap:"):])
            else:
                self.log.error("schedule.error", schedule=s.name, queue=s.queue, tick=at, error=code)
        if skew and retry:  # our estimate of Redis's clock was off around a tick: again, with the new estimate
            return self.run(retry=False)
        wait = min(nxt for _, _, _, nxt in sent) - redis_ms  # <= 0 if a tick passed meanwhile: check again soon
        self.next_check = time.monotonic() + min(MAX_CHECK, max(MIN_CHECK, wait / 1000 + LATE_BY))


# --- status ---

def collect(r, prefix: str, now_ms: float) -> list:
    """The schedules workers have written (``P:schedules``, each ``P:sched:<name>``), for ``status --json``."""
    k = Keys(prefix)
    names = r.zrange(k.schedules, 0, -1)
    with r.pipeline(transaction=False) as p:
        for n in names:
            p.hgetall(k.sched(n))
        infos = p.execute() if names else []
    out = []
    for name, h in zip(names, infos):
        if not h:
            continue  # expired: no worker has had this schedule for a while

        def sec(field):
            try:
                return float(h[field]) / 1000
            except (KeyError, TypeError, ValueError):
                return None
        out.append({"name": name, "spec": h.get("spec"), "queue": h.get("queue"), "last": sec("last"),
                    "next": sec("next"), "skipped": sec("skipped"), "skip_reason": h.get("reason") or None})
    return sorted(out, key=lambda s: s["name"])


def render(rows: list, table, paused: list) -> list:
    """The human table's lines (``table`` is ``status._table``)."""
    if not rows:
        return []

    def at(t):
        return "-" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
    body = [(s["name"], s["queue"] or "-", at(s["last"]), at(s["next"]),
             "yes" if s["queue"] in paused or "*" in paused else "no", s["spec"] or "-") for s in rows]
    return table(("SCHEDULE", "QUEUE", "LAST_UTC", "NEXT_UTC", "PAUSED", "WHEN"), body) + [""]
