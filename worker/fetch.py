"""Claim and acknowledge: the fetch contract, on a few atomic Lua scripts (``worker/lua/*.lua``, called through
``worker.lua.calls``; key schema: ``keys.py``).

Invariants (at-least-once delivery; losing a job is worse than running it twice):

* A claimed job is moved from its queue into this worker's processing list by ``LMOVE`` inside the same script
  that chose it, so there is never a moment where it exists only in a process's memory.
* It leaves the processing list only inside the script that records its outcome (done, failed, retry scheduled,
  or put back at the head of its queue).
* The outcome of job N and the claim of job N+1 travel in one script call (:meth:`Broker.cycle`): one round trip
  per job on the hot path, which also refreshes the heartbeat and moves due scheduled jobs.
* A worker is dead once its own deadline (last beat + its own ``HEARTBEAT_TTL``) has passed on the Redis clock;
  :meth:`Broker.recover` moves its processing list back to the head of the queues in one script, so several
  workers recovering at once cannot double it.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Optional

import redis

from .payload import build_payload, is_unique, unique_id, unique_lock
from .config import Config
from .keys import Keys
from . import lua
from .lua import calls as wire
from .lua.calls import Claim, Cycle, Recovered  # noqa: F401  (their home is the scripts' reply parsing)


class Op(str, Enum):
    """What recording an outcome does with the job (it always leaves the processing list)."""

    ACK = "ack"          # done: counted as processed
    FAIL = "fail"        # into the failed registry
    RETRY = "retry"      # into the schedule with a new payload (attempts + 1), due after a backoff
    REQUEUE = "requeue"  # back to the head of its queue (an interruption: not an attempt)
    CANCEL = "cancel"    # stopped by cancel(running=True): status canceled, not put back


@dataclass(frozen=True)
class Outcome:
    """How a claimed job ended, recorded by the next :meth:`Broker.cycle` (the unit of work's ack/requeue).
    ``job_id`` names the job's status record (``P:job:<id>``); '' keeps none."""

    op: Op
    payload: str
    slot: int = 0
    job_id: str = ""
    record: str = ""        # FAIL: the failure record (JSON)
    new_payload: str = ""   # RETRY: the payload to run next time; REQUEUE: the payload to put back ('' = as is)
    delay_ms: int = 0       # RETRY: backoff before it is due
    queue: str = ""         # REQUEUE: where it goes back
    result: str = ""        # ACK: the job's return value (JSON), '' for None
    keep_ms: Optional[int] = None  # ACK: how long its status record (and result) is kept; None = RESULT_TTL
    attempts: int = 0       # FAIL, RETRY: failed attempts so far; REQUEUE: lost attempts so far (0: unchanged)
    started_ms: int = 0     # when it was claimed (ms, Redis clock, from Claim.at); 0 = unknown (read from Redis)
    warning: str = ""       # ACK: a warning kept in its status record (a result that was not JSON); '' = none

    @classmethod
    def ack(cls, payload, slot=0, job_id="", result="", keep_ms=None, warning=""):
        return cls(Op.ACK, payload, slot, job_id=job_id, result=result, keep_ms=keep_ms, warning=warning)

    @classmethod
    def requeue(cls, payload, queue, slot=0, new_payload="", job_id="", attempts=0):
        """Put back at the head of ``queue``, as ``new_payload`` if given (it carries the job's checkpoint and
        interruption count). An interruption does not count as an attempt (``attempts`` 0: the status record's
        stays); a run lost with the fork server does (``attempts``: the new count, shown by its status record)."""
        return cls(Op.REQUEUE, payload, slot, job_id=job_id, queue=queue, new_payload=new_payload, attempts=attempts)

    @classmethod
    def cancel(cls, payload, slot=0, job_id="", keep_ms=None):
        return cls(Op.CANCEL, payload, slot, job_id=job_id, keep_ms=keep_ms)

    @classmethod
    def fail(cls, payload, job_id, record: dict, slot=0, attempts=0):
        return cls(Op.FAIL, payload, slot, job_id=job_id, attempts=attempts,
                   record=json.dumps(record, separators=(",", ":"), default=str))

    @classmethod
    def retry(cls, payload, new_payload: str, delay: float, slot=0, job_id="", attempts=0):
        return cls(Op.RETRY, payload, slot, job_id=job_id, new_payload=new_payload, delay_ms=int(delay * 1000),
                   attempts=attempts)

    def wire(self, cfg: Config) -> tuple:
        """The eight CYCLE fields of this outcome (``cycle.lua``; laid out by :func:`worker.lua.calls.outcome`)."""
        return wire.outcome(self, int(cfg.result_ttl * 1000), int(cfg.failed_ttl * 1000))


#: Seconds an enqueue call's dedupe key lives at least (``P:enq:<id>``, see :attr:`Broker.dedupe_ttl_ms`).
ENQUEUE_DEDUPE_MIN = 60.0


def backoff_delay(attempt: int, base: float = 2.0, cap: float = 3600.0) -> float:
    """Exponential backoff for retry number ``attempt`` (1-based), jittered to 50-100% of the step."""
    return random.uniform(0.5, 1.0) * min(cap, base * (2 ** max(0, attempt - 1)))


RECOVER_SLACK_MS = 1000  # a late worker's grace is its own interval + this: time to beat again after a stall


class Broker:
    """All Redis operations of the runtime on one client (one connection in a single-threaded process). In the
    worker, ``link`` makes the script calls wait in the loop's ``select`` (see :class:`worker.client.Link`)."""

    def __init__(self, redis_client, cfg: Config, link=None):
        self.r = redis_client
        self.cfg = cfg
        self.link = link  # a client.Link: script calls wait in the supervisor's select (see Supervisor)
        self.epoch = ""   # P:epoch as :meth:`register` found it ('' = not registered: CYCLE does not check it)
        self.keys = Keys(cfg.key_prefix)
        self.scripts = lua.Registry(redis_client)
        self._groups: dict = {}  # QUEUE_GROUPS: group -> its Broker (see group())
        self.limits: list = [0]  # CYCLE's limits section (wire.limits of the jobs' meta; set by the supervisor)
        self.served: list = []   # RECOVER's (wire.served): our jobs, whose held ones it releases (issue 25)

    # --- queue groups (QUEUE_GROUPS, worker/groups.py): one key space per group ---
    def group(self, name: str) -> "Broker":
        """The broker of group ``name``'s key space (itself when ungrouped, or when it is that group's)."""
        if not name or self.cfg.group_prefix(name) == self.keys.prefix:
            return self
        b = self._groups.get(name)
        if b is None:
            from .client import for_space
            cfg = self.cfg.space(name)
            b = self._groups[name] = Broker(None if self.r is None else for_space(self.r, cfg.key_prefix), cfg)
        return b

    def space(self, queue: str) -> "Broker":
        """The broker of ``queue``'s group (``ValueError`` for a queue in no group of QUEUE_GROUPS)."""
        return self.group(self.cfg.group_of(queue)) if self.cfg.queue_groups else self

    def spaces(self) -> list:
        """A broker per key space: every group's in QUEUE_GROUPS order, or ``[self]`` when ungrouped."""
        return [self.group(g) for g, _ in self.cfg.queue_groups] or [self]

    def find(self, job_id: str) -> "Broker":
        """The broker of the key space that holds job ``job_id`` (its status or failed record), searched group by
        group (one round trip each); itself when ungrouped or found nowhere. An id in several groups (a producer's
        own id reused): the group where it still waits (queued or scheduled) wins over one where it has ended."""
        if not self.cfg.queue_groups:
            return self
        first = None
        for b in self.spaces():
            with b.r.pipeline(transaction=False) as p:
                p.exists(b.keys.job(job_id)).hexists(b.keys.failed_data, job_id).hget(b.keys.job(job_id), "status")
                got = p.execute(raise_on_error=False)
            if got[2] in ("queued", "scheduled"):
                return b
            if first is None and any(x is True or (isinstance(x, int) and x > 0) for x in got[:2]):
                first = b
        return first or self

    # --- producers ---
    def push(self, name: str, args, kwargs, queue: Optional[str] = None, due: Optional[float] = None,
             delay: Optional[float] = None, job_id: Optional[str] = None, options: Optional[dict] = None) -> str:
        """Enqueue one job now, ``delay`` seconds from now (on the Redis clock, which moves scheduled jobs) or at
        unix time ``due``. One round trip; a call redis-py re-sends after a timeout enqueues nothing twice.
        ``job_id``: the producer's own id; while a job of that id is queued, scheduled or running, nothing is
        enqueued (enqueue.lua) and the id is returned all the same. ``options``: per-call (payload.PER_CALL)."""
        job_id, call = self.push_call(name, args, kwargs, queue, due, delay, job_id, options)
        return wire.enqueued_id(job_id, self.scripts.run(call))

    def push_call(self, name: str, args, kwargs, queue: Optional[str] = None, due: Optional[float] = None,
                  delay: Optional[float] = None, job_id: Optional[str] = None,
                  options: Optional[dict] = None) -> tuple:
        """``(job_id, Call)``: the checked payload and the ENQUEUE call :meth:`push` runs, for a client of another
        kind to run (``worker.aio_api``, on redis-py's asyncio client)."""
        if delay is not None:
            delay = float(delay)
            if not math.isfinite(delay):
                raise ValueError(f"delay must be a finite number of seconds, not {delay!r}")
            when, at = (f"+{int(delay * 1000)}", time.time() + delay) if delay > 0 else ("", None)
        elif due is not None:
            due = float(due)
            if not math.isfinite(due):
                raise ValueError(f"due time must be a finite unix time, not {due!r}")
            when, at = f"@{int(due * 1000)}", due
        else:
            when, at = "", None
        mode = "1" if job_id is not None else ""
        if job_id is None:  # @job(unique=): the id derived from the arguments, deduplicated as an own id
            job_id = unique_id(name, args, kwargs)  # (unique_until="start": the key's lock decides, "s")
            mode = "" if job_id is None else "s" if unique_lock(job_id) else "1"
        job_id, q, payload = build_payload(name, args, kwargs, queue, self.cfg.max_payload, at=at, job_id=job_id,
                                           options=options)
        # an own id may come again once its job ended: the call's dedupe marker must be the call's, not the id's
        dedupe = f"{job_id}:{os.urandom(6).hex()}" if mode else job_id
        return job_id, self.space(q).enqueue_call(q, dedupe, when, [(job_id, name, payload)], unique=mode)

    def push_many(self, name: str, calls: Iterable, queue: Optional[str] = None, batch: int = 1000) -> list:
        if is_unique(name):
            return [self.push(name, *(c if isinstance(c, tuple) and len(c) == 2 and isinstance(c[1], dict)
                                      else (c, {})), queue=queue) for c in calls]  # unique: one dedupe per call
        ids, by_queue = [], {}
        for call in calls:
            if isinstance(call, tuple) and len(call) == 2 and isinstance(call[1], dict):
                args, kwargs = call
            else:
                args, kwargs = call, {}
            job_id, q, payload = build_payload(name, args, kwargs, queue, self.cfg.max_payload)
            ids.append(job_id)
            by_queue.setdefault(q, []).append((job_id, payload))
        by_space: dict = {}  # QUEUE_GROUPS: one pipeline per key space (on a cluster, its own node)
        for q, items in by_queue.items():
            b = self.space(q)
            by_space.setdefault(id(b), (b, []))[1].append((q, items))
        for b, queues in by_space.values():
            with b.r.pipeline(transaction=False) as pipe:
                for q, items in queues:
                    for i in range(0, len(items), batch):
                        chunk = items[i:i + batch]
                        # the batch's dedupe key is its first job's id: one key per script call
                        b._call_enqueue(q, chunk[0][0], "", [(i, name, p) for i, p in chunk], client=pipe)
                pipe.execute()
        return ids

    def _call_enqueue(self, q: str, dedupe_id: str, when: str, jobs_: list, client=None, unique=""):
        """One ENQUEUE call for ``jobs_`` = ``[(job_id, name, payload), ...]`` (one name per call)."""
        return self.scripts.run(self.enqueue_call(q, dedupe_id, when, jobs_, unique), client)

    def enqueue_call(self, q: str, dedupe_id: str, when: str, jobs_: list, unique=""):
        return wire.enqueue(self.keys, q, dedupe_id, self.dedupe_ttl_ms, when, jobs_, unique)

    @property
    def dedupe_ttl_ms(self) -> int:
        """How long an enqueue call is remembered (``P:enq:<id>``): well past every retry redis-py makes of it
        (3 retries, each bounded by REDIS_TIMEOUT for connect and reply, plus at most 1 s of backoff)."""
        return int(max(ENQUEUE_DEDUPE_MIN, 10 * self.cfg.redis_timeout) * 1000)

    def check_server(self) -> Optional[str]:
        """A warning to log at worker start if the server may lose the runtime's keys, else None.

        Any ``maxmemory-policy`` but ``noeviction`` lets Redis evict keys under memory pressure: the worker
        registry, a processing list or a queue could vanish, orphaning or losing jobs (Sidekiq warns likewise).
        Uses ``INFO memory`` (``CONFIG`` may be disabled on hosted Redis)."""
        try:
            info = self.r.info("memory")
        except redis.ResponseError:
            return None
        policy = info.get("maxmemory_policy")
        if policy in (None, "", "noeviction"):
            return None
        return (f"Redis maxmemory-policy is {policy!r}: under memory pressure Redis may evict queues, processing "
                f"lists or the worker registry and lose or orphan jobs; set it to 'noeviction' "
                f"(Heroku: heroku redis:maxmemory --policy noeviction)")

    # --- the worker's side ---
    def register(self, worker: str, info: dict) -> None:
        """Register ``worker`` (its hash holds ``ttl``: its score in P:workers is a deadline, see ``recover.lua``);
        a ``P:recovered:<w>`` of an earlier incarnation, or one already acted on, goes."""
        k, ttl = self.keys, int(self.cfg.heartbeat_ttl * 1000)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(k.worker(worker), k.recovered(worker))
            pipe.hset(k.worker(worker), mapping=dict(info, ttl=ttl, interval=int(self.cfg.heartbeat_interval * 1000)))
            self.scripts.run(wire.heartbeat(k, worker, ttl), pipe)
            pipe.set(k.epoch, os.urandom(8).hex(), nx=True)
            pipe.get(k.epoch)
            self.epoch = pipe.execute()[-1] or ""

    def restore(self, worker: str, info: dict, held: list) -> None:
        """After Redis lost its data (:attr:`Cycle.lost`): register again and make the processing list hold exactly
        ``held``, the payloads of the jobs this worker still holds (running, or finished and not yet recorded), so
        that they can be recorded, put back, or recovered if this worker dies."""
        self.register(worker, info)
        k = self.keys
        with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(k.processing(worker))
            if held:
                pipe.rpush(k.processing(worker), *held)
            pipe.execute()

    def cycle(self, worker: str, outcomes=(), claim=(), busy: int = 0, mode: str = "", checkpoints=(),
              beat: bool = True, tidy: bool = True) -> Cycle:
        """Record ``outcomes``, refresh the heartbeat (``beat``), move due scheduled jobs (``tidy``) and claim a job
        for each slot number in ``claim``, in one round trip (``cycle.lua``). ``busy``: slots still running besides
        new claims; ``mode``: a state to show instead of the derived one; ``checkpoints``: ``(slot, JSON)`` of
        running jobs whose progress changed, kept for recovery. ``Cycle.held`` counts what the processing list holds
        afterwards (-1 when not beating): more than the caller knows of means an earlier call's reply was lost after
        it claimed."""
        c = self.cfg
        call = wire.cycle(self.keys, worker, beat_ttl_ms=int(c.heartbeat_ttl * 1000) if beat else "",
                           failed_max=c.failed_max, failed_ttl_ms=int(c.failed_ttl * 1000), wildcard=c.all_queues,
                           mode=mode, busy=busy, tidy=tidy, epoch=self.epoch,
                           queues=[] if c.all_queues else list(c.queues), checkpoints=checkpoints,
                           outcomes=[o.wire(c) for o in outcomes], claim=claim, limits=self.limits)
        return wire.parse_cycle(self.run(call))

    def run(self, call: "wire.Call"):
        """Run a script call (a :class:`worker.lua.calls.Call`): through ``link`` in the worker (its wait sits in
        the loop's ``select``), else directly."""
        script = self.scripts.script(call.script)
        if self.link is not None:
            return self.link.script(script, call.keys, call.args)
        return script(keys=call.keys, args=call.args)

    _call = run  # (its name before issue 22)

    def wake(self, queues) -> None:
        """Ring the wake lists of ``queues`` (a token taken by a worker that could not use it is given back)."""
        if queues:
            self.scripts.run(wire.wake(self.keys, queues))

    def claimed(self, worker: str) -> list:
        """What this worker's processing list holds (used to re-adopt claims whose reply was lost)."""
        return self.r.lrange(self.keys.processing(worker), 0, -1)

    def claims_and_recovered(self, worker: str) -> tuple:
        """What this worker's processing list holds, and the ids of its jobs another worker recovered
        (``P:recovered:<w>``), in one round trip."""
        with self.r.pipeline(transaction=True) as pipe:
            pipe.lrange(self.keys.processing(worker), 0, -1)
            pipe.smembers(self.keys.recovered(worker))
            held, gone = pipe.execute(raise_on_error=False)
        if isinstance(held, Exception):
            raise held
        return held, (gone if isinstance(gone, set) else set())  # a key of another type: no recovery seen

    def name_in_use(self, worker: str) -> bool:
        """True if a worker of this name is registered, left a processing list, or was recovered within a day
        (same $DYNO and pid after a restart: the old dyno may still be shutting down, may have crashed with a job
        in its list, or may be only stalled, and find its ``P:recovered:<w>`` when it resumes)."""
        with self.r.pipeline(transaction=False) as pipe:
            pipe.zscore(self.keys.workers, worker)
            pipe.exists(self.keys.processing(worker), self.keys.worker(worker), self.keys.recovered(worker))
            score, n = pipe.execute()
        return score is not None or n > 0

    def set_state(self, worker: str, state: str) -> None:
        self.r.hset(self.keys.worker(worker), "state", state)

    def heartbeat(self, worker: str) -> None:
        self.scripts.run(wire.heartbeat(self.keys, worker, int(self.cfg.heartbeat_ttl * 1000)))

    def recover(self, skip: str = "") -> "Recovered":
        """Requeue the jobs of dead workers (late past their grace, see ``recover.lua``); returns
        ``['requeued:<id>' | 'failed:<id>' | 'canceled:<id>', ...]`` with ``.wait``: seconds until a late worker's grace ends."""
        c = self.cfg
        return wire.parse_recover(self.run(wire.recover(
            self.keys, int(c.heartbeat_ttl * 1000), c.max_attempts, c.failed_max, int(c.failed_ttl * 1000), skip,
            RECOVER_SLACK_MS, int(c.result_ttl * 1000), self.served)))

    def wrong_types(self, worker: str = "", extra=()) -> list:
        """``[(key, type), ...]``: the runtime's fixed keys (and ``worker``'s own) that hold another type than the
        schema says (``keys.py``). Used to name the key when Redis answers WRONGTYPE somewhere no script names it."""
        k = self.keys
        want = [(k.queues, "set"), (k.workers, "zset"), (k.scheduled, "zset"), (k.failed, "zset"),
                (k.failed_data, "hash"), (k.paused, "set"), (k.processed, "string"), (k.failed_count, "string"),
                (k.suspects, "hash"), (k.epoch, "string")]
        if worker:
            want += [(k.processing(worker), "list"), (k.worker(worker), "hash"), (k.recovered(worker), "set")]
        want += [(key, "list") for key in extra]
        with self.r.pipeline(transaction=False) as pipe:
            for key, _ in want:
                pipe.type(key)
            got = pipe.execute()
        got = [g.decode() if isinstance(g, bytes) else g for g in got]
        return [(key, t) for (key, w), t in zip(want, got) if t not in (w, "none")]

    def unregister(self, worker: str) -> bool:
        return bool(self.scripts.run(wire.unregister(self.keys, worker)))

    def wake_keys(self, queues) -> list:
        return [self.keys.wake(q) for q in queues]
