"""What happened to a job: ``get_job(job_id)`` and ``python -m worker job ID [--json]``.

Every job has a status record ``P:job:<id>`` (``keys.py``), written in the same Lua calls that already enqueue
and record it (no extra round trip): ``queued`` or ``scheduled`` at enqueue, then ``done`` (with the return value),
``failed`` (the error is its failed-registry record), ``scheduled`` again for a retry, ``queued`` again when it is
put back or recovered. The claim writes nothing there (that would cost every job a write): a running job is found
in its worker's slots (``P:worker:<w>``, fields ``job:<slot>`` and ``started:<slot>``). It expires ``RESULT_TTL`` seconds after the job is done
(``@job(result_ttl=…)``; 0 keeps none) and ``FAILED_TTL`` after it failed, so the number of keys stays flat.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

STATUSES = ("queued", "scheduled", "running", "done", "failed", "canceled")
FINAL = ("done", "failed", "canceled")  # a job in one of these has ended: wait() returns it
WAIT_SLICE = 1.0  # seconds a wait() blocks at most before it reads the status again (a lost push cannot hang it)
WAIT_OUTAGE = 60.0  # seconds a wait() without a timeout rides out Redis being unreachable before it re-raises


@dataclass(frozen=True)
class Job:
    """A job's status as Redis has it now. Times are unix seconds (Redis clock); ``None`` where not yet known."""

    id: str
    name: Optional[str]
    queue: Optional[str]
    status: str                      # one of STATUSES
    result: Any = None               # the return value (JSON) once done
    error: Optional[dict] = None     # {"type", "message", "traceback", "cause"} once failed
    attempts: int = 0                # failed or lost attempts so far
    enqueued_at: Optional[float] = None
    started_at: Optional[float] = None
    ended_at: Optional[float] = None
    worker: Optional[str] = None     # the worker that ran it last
    warning: Optional[str] = None    # done, but its return value was not JSON: ``result`` is a marker

    def to_dict(self) -> dict:
        return asdict(self)

    def wait(self, timeout: Optional[float] = None) -> "Job":
        """Block until this job has ended (done, failed or canceled) and return its final :class:`Job` (a failed job is
        returned, not raised). ``TimeoutError`` after ``timeout`` seconds (None: no limit). Woken by the script
        that records the outcome (no polling); see :func:`wait`. Under ``worker.testing.inline()``: at once."""
        return wait(self.id, timeout)


def _seconds(ms) -> Optional[float]:
    try:
        return round(float(ms) / 1000.0, 3)
    except (TypeError, ValueError):
        return None


def _json(text) -> Any:
    try:
        return json.loads(text) if text else None
    except (ValueError, RecursionError):
        return None


def _running(r, keys, job_id: str) -> Optional[tuple]:
    """``(worker, started_ms)`` if a worker holds ``job_id`` in one of its slots now. The claim writes no status
    (that would cost every job a write): a running job is found where its worker shows it."""
    workers = r.zrange(keys.workers, 0, -1)
    if not workers:
        return None
    with r.pipeline(transaction=False) as p:
        for w in workers:
            p.hgetall(keys.worker(w))
        infos = p.execute()
    return held_by(workers, infos, job_id)


def held_by(workers, infos, job_id: str) -> Optional[tuple]:
    """``(worker, started_ms)`` of the worker whose hash (in ``infos``, one per name in ``workers``) shows
    ``job_id`` in a slot, or None."""
    needle = f'{{"id":"{job_id}"'
    for w, info in zip(workers, infos):
        for field, value in info.items():
            if field.startswith("job:") and value.startswith(needle):
                return w, info.get("started:" + field[4:])
    return None


def fetch(r, keys, job_id: str) -> Optional[Job]:
    """The :class:`Job` for ``job_id`` read through client ``r`` (two round trips while it is not finished), or
    None if unknown/expired."""
    with r.pipeline(transaction=False) as p:
        p.hgetall(keys.job(job_id))
        p.hget(keys.failed_data, job_id)
        info, failure = p.execute()
    if not info:
        return None
    held = _running(r, keys, job_id) if info.get("status") in ("queued", "scheduled") else None
    return build(job_id, info, failure, held)


def build(job_id: str, info: dict, failure, held: Optional[tuple]) -> Job:
    """The :class:`Job` from its status record ``info``, its failed-registry record ``failure`` (JSON text) and
    ``held`` (:func:`held_by`'s answer): one reading for the sync and the async client (``worker.aio_api``)."""
    if held is not None:
        info = dict(info, status="running", worker=held[0], started_at=held[1])
    error = None
    if info.get("status") == "failed":
        rec = _json(failure) or {}
        error = {k: rec.get(k) for k in ("type", "message", "traceback", "cause")}
    try:
        attempts = int(info.get("attempts") or 0)
    except ValueError:
        attempts = 0
    return Job(id=job_id, name=info.get("name"), queue=info.get("queue"), status=info.get("status") or "queued",
               result=_json(info.get("result")), error=error, attempts=attempts,
               enqueued_at=_seconds(info.get("enqueued_at")), started_at=_seconds(info.get("started_at")),
               ended_at=_seconds(info.get("ended_at")), worker=info.get("worker"), warning=info.get("warning"))


def located(broker, job_id: str):
    """``broker`` narrowed to the queue group that holds ``job_id`` (QUEUE_GROUPS, ``Broker.find``); a broker of
    another kind (set with ``worker.jobs.use``) as it is."""
    find = getattr(broker, "find", None)
    return find(job_id) if callable(find) else broker


def get_job(job_id: str) -> Optional[Job]:
    """What happened to job ``job_id`` (the id ``enqueue`` returned): a :class:`Job`, or None if the id is unknown
    or its record has expired (``RESULT_TTL`` after it was done). Uses the same connection as ``enqueue``; under
    ``worker.testing.inline()`` it reports the jobs run in-process."""
    if not isinstance(job_id, str) or not job_id:
        raise TypeError("job id must be a non-empty string")
    from . import jobs, testing
    if testing.active():  # worker.testing.inline(): jobs run in-process, no Redis
        found = testing.lookup(job_id)
        return None if found is None else Job(**found)
    broker = located(jobs.default_broker(), job_id)
    return fetch(broker.r, broker.keys, job_id)


def wait(job_id: str, timeout: Optional[float] = None) -> Optional["Job"]:
    """Job ``job_id``'s final :class:`Job` once it has ended; None if it has no status record (unknown, or
    expired: a job done with ``result_ttl=0`` before the wait began). ``TimeoutError`` after ``timeout`` s.

    The waiter marks the job's record (an expiry of a year on a record that has none, await.lua, which also
    reads its status) and blocks on ``P:done:<id>`` (BLPOP), where the script recording the outcome pushes the
    final record only for a marked job (its ``PEXPIRE ... NX`` finds the mark): jobs nobody waits for pay nothing.
    It blocks in slices of at most ``WAIT_SLICE`` s and marks and reads the status again between them, so a push
    lost in a failover (or a job failed by recovery, which pushes nothing) delays the return by a slice at most,
    never hangs it.

    Redis unreachable (a restart, a failover, a network blip): the wait tries again every 0.5 s until it is back,
    until ``timeout`` runs out (or ``WAIT_OUTAGE`` s of outage without one), and then re-raises the connection
    error: a wait that could not talk to Redis says so, rather than that the job did not end."""
    from . import jobs, testing
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0):
        raise ValueError(f"wait: timeout must be None or a number of seconds >= 0, not {timeout!r}")
    if testing.active():
        found = testing.lookup(job_id)
        return None if found is None else Job(**found)
    broker = located(jobs.default_broker(), job_id)
    r, keys = broker.r, broker.keys
    from .lua import calls
    deadline = None if timeout is None else time.monotonic() + timeout
    piece = max(0.05, min(WAIT_SLICE, broker.cfg.redis_timeout / 2))
    import redis
    outage = None  # monotonic time Redis was first found unreachable, None while it answers
    while True:
        try:
            status = broker.scripts.run(calls.await_(keys, job_id))
            if status in FINAL or not status:
                return fetch(r, keys, job_id)
            left = piece if deadline is None else min(piece, deadline - time.monotonic())
            if left <= 0:
                raise TimeoutError(f"job {job_id} has not ended within {timeout:g} s (status: {status})")
            pushed = _pop(r, keys.done(job_id), left)
            if pushed is not None:
                with r.pipeline(transaction=False) as p:  # put it back for any other waiter (it expires on its own)
                    p.lpush(keys.done(job_id), pushed[1]).pexpire(keys.done(job_id), 60000)
                    p.execute()
                return fetch(r, keys, job_id) or _pushed(job_id, pushed[1])
            outage = None
        except (redis.ConnectionError, redis.TimeoutError):
            now = time.monotonic()
            outage = now if outage is None else outage
            until = deadline if deadline is not None else outage + WAIT_OUTAGE
            if now >= until:
                raise
            time.sleep(min(0.5, until - now))


def _pop(r, key: str, seconds: float):
    """BLPOP ``key`` for up to ``seconds``; a key of the wrong type (another program's) is slept over instead: the
    caller re-reads the status each slice (adversarial review of issue 24)."""
    import redis
    try:
        return r.blpop([key], timeout=seconds)
    except redis.ResponseError as exc:
        if not str(exc).startswith("WRONGTYPE"):
            raise
        time.sleep(seconds)
        return None


def _pushed(job_id: str, item: str) -> Job:
    """A Job from the record the outcome pushed (``<status>\n<body>``): for a job whose status record is gone
    already (``result_ttl=0``)."""
    status, _, body = item.partition("\n")
    if status == "failed":
        rec = _json(body) or {}
        return Job(id=job_id, name=rec.get("name"), queue=rec.get("queue"), status=status,
                   error={k: rec.get(k) for k in ("type", "message", "traceback", "cause")})
    return Job(id=job_id, name=None, queue=None, status=status, result=_json(body))


async def get_job_async(job_id: str) -> Optional[Job]:
    """:func:`get_job` for async code (``await``), on redis-py's asyncio client (``worker.aio_broker``)."""
    if not isinstance(job_id, str) or not job_id:
        raise TypeError("job id must be a non-empty string")
    from . import aio_broker, testing
    if testing.active():
        found = testing.lookup(job_id)
        return None if found is None else Job(**found)
    info, failure, held = await aio_broker.default().read_job(job_id)
    if not info:
        return None
    return build(job_id, info, failure, None if held is None else held_by(held[0], held[1], job_id))
