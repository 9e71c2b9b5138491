"""Claim and acknowledge: the fetch contract, on a few atomic Lua scripts (``lua.py``; key schema: ``keys.py``).

Invariants (at-least-once delivery; losing a job is worse than running it twice):

* A claimed job is moved from its queue into this worker's processing list by ``LMOVE`` inside the same script
  that chose it, so there is never a moment where it exists only in a process's memory.
* It leaves the processing list only inside the script that records its outcome (done, failed, retry scheduled,
  or put back at the head of its queue).
* The outcome of job N and the claim of job N+1 travel in one script call (:meth:`Broker.cycle`): one round trip
  per job on the hot path, which also refreshes the heartbeat and moves due scheduled jobs.
* A worker whose heartbeat is older than ``HEARTBEAT_TTL`` is dead; :meth:`Broker.recover` moves its processing
  list back to the head of the queues in one script, so several workers recovering at once cannot double it.
"""
from __future__ import annotations

import json
import math
import random
import time
from typing import Iterable, NamedTuple, Optional

import redis

from . import jobs
from .config import Config
from .keys import Keys
from .lua import CYCLE, ENQUEUE, HEARTBEAT, RECOVER, UNREGISTER

#: Seconds an enqueue call's dedupe key lives at least (``P:enq:<id>``, see :attr:`Broker.dedupe_ttl_ms`).
ENQUEUE_DEDUPE_MIN = 60.0


class Cycle(NamedTuple):
    """What :meth:`Broker.cycle` found: the claimed payload and its queue (or None), the next scheduled due time
    (ms, when nothing was claimed), the queue names considered, and how many jobs the processing list holds."""

    payload: Optional[str]
    queue: Optional[str]
    next_due: Optional[float]
    queues: list
    held: int


class Outcome:
    """How a claimed job ended, to be recorded by the next :meth:`Broker.cycle` (the unit of work's ack/requeue)."""

    __slots__ = ("op", "payload", "job_id", "extra", "extra2")

    def __init__(self, op: str, payload: str, job_id: str = "", extra: str = "", extra2: str = ""):
        self.op, self.payload, self.job_id, self.extra, self.extra2 = op, payload, job_id, extra, extra2

    @classmethod
    def ack(cls, payload):
        return cls("ack", payload)

    @classmethod
    def requeue(cls, payload, queue):
        """Put back at the head of ``queue`` (graceful interruption: does not count as an attempt)."""
        return cls("requeue", payload, extra2=queue)

    @classmethod
    def fail(cls, payload, job_id, record: dict):
        return cls("fail", payload, job_id, json.dumps(record, separators=(",", ":"), default=str))

    @classmethod
    def retry(cls, payload, new_payload: str, delay: float):
        return cls("retry", payload, extra=new_payload, extra2=str(int(delay * 1000)))


def backoff_delay(attempt: int, base: float = 2.0, cap: float = 3600.0) -> float:
    """Exponential backoff for retry number ``attempt`` (1-based), jittered to 50-100% of the step."""
    return random.uniform(0.5, 1.0) * min(cap, base * (2 ** max(0, attempt - 1)))


class Broker:
    """All Redis operations of the runtime on one client (one connection in a single-threaded process)."""

    def __init__(self, redis_client, cfg: Config):
        self.r = redis_client
        self.cfg = cfg
        self.keys = Keys(cfg.key_prefix)
        self._enqueue = redis_client.register_script(ENQUEUE)
        self._cycle = redis_client.register_script(CYCLE)
        self._recover = redis_client.register_script(RECOVER)
        self._unregister = redis_client.register_script(UNREGISTER)

    # --- producers ---
    def push(self, name: str, args, kwargs, queue: Optional[str] = None, due: Optional[float] = None,
             delay: Optional[float] = None) -> str:
        """Enqueue one job now, ``delay`` seconds from now (on the Redis clock, which moves scheduled jobs) or at
        unix time ``due``. One round trip; a call redis-py re-sends after a timeout enqueues nothing twice."""
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
        job_id, q, payload = jobs.build_payload(name, args, kwargs, queue, self.cfg.max_payload, at=at)
        self._call_enqueue(q, job_id, when, [payload])
        return job_id

    def push_many(self, name: str, calls: Iterable, queue: Optional[str] = None, batch: int = 1000) -> list:
        ids, by_queue = [], {}
        for call in calls:
            if isinstance(call, tuple) and len(call) == 2 and isinstance(call[1], dict):
                args, kwargs = call
            else:
                args, kwargs = call, {}
            job_id, q, payload = jobs.build_payload(name, args, kwargs, queue, self.cfg.max_payload)
            ids.append(job_id)
            by_queue.setdefault(q, []).append((job_id, payload))
        with self.r.pipeline(transaction=False) as pipe:
            for q, items in by_queue.items():
                for i in range(0, len(items), batch):
                    chunk = items[i:i + batch]
                    # the batch's dedupe key is its first job's id: one key per script call
                    self._call_enqueue(q, chunk[0][0], "", [p for _, p in chunk], client=pipe)
            pipe.execute()
        return ids

    def _call_enqueue(self, q: str, dedupe_id: str, when: str, payloads: list, client=None):
        k = self.keys
        return self._enqueue(keys=[k.queue(q), k.queues, k.scheduled, k.enqueued(dedupe_id)],
                             args=[k.prefix, q, self.dedupe_ttl_ms, when, *payloads], client=client)

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
        with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.worker(worker))
            pipe.hset(self.keys.worker(worker), mapping=info)
            pipe.eval(HEARTBEAT, 1, self.keys.workers, worker)
            pipe.execute()

    def cycle(self, worker: str, outcome: Optional[Outcome], claim: bool) -> "Cycle":
        """Record ``outcome`` (if any), refresh the heartbeat, move due scheduled jobs and, if ``claim``, claim the
        next job, in one round trip. ``Cycle.held`` counts what the processing list holds afterwards: more than
        the claimed job means an earlier call's reply was lost after it claimed (see :meth:`claimed`)."""
        o = outcome or Outcome("", "")
        k = self.keys
        res = self._cycle(
            keys=[k.processing(worker), k.workers, k.worker(worker), k.scheduled, k.paused, k.queues],
            args=[k.prefix, worker, o.op, o.payload, o.job_id, o.extra, o.extra2, "1" if claim else "0",
                  self.cfg.failed_max, int(self.cfg.failed_ttl * 1000), "1" if self.cfg.all_queues else "0",
                  *([] if self.cfg.all_queues else self.cfg.queues)])
        if res[1]:  # the queue name: a claimed payload may itself be an empty string
            return Cycle(res[0], res[1], None, [], int(res[3]))
        return Cycle(None, None, float(res[2]) if res[2] else None, list(res[4:]), int(res[3]))

    def claimed(self, worker: str) -> list:
        """What this worker's processing list holds (used to re-adopt claims whose reply was lost)."""
        return self.r.lrange(self.keys.processing(worker), 0, -1)

    def name_in_use(self, worker: str) -> bool:
        """True if a worker of this name is registered or left a processing list (same $DYNO and pid after a
        restart: the old dyno may still be shutting down, or may have crashed with a job in its list)."""
        with self.r.pipeline(transaction=False) as pipe:
            pipe.zscore(self.keys.workers, worker)
            pipe.exists(self.keys.processing(worker), self.keys.worker(worker))
            score, n = pipe.execute()
        return score is not None or n > 0

    def set_state(self, worker: str, state: str) -> None:
        self.r.hset(self.keys.worker(worker), "state", state)

    def heartbeat(self, worker: str) -> None:
        self.r.eval(HEARTBEAT, 1, self.keys.workers, worker)

    def recover(self, skip: str = "") -> list:
        """Requeue the jobs of workers whose heartbeat expired; returns ``['requeued:<id>' | 'failed:<id>', ...]``."""
        c = self.cfg
        return self._recover(keys=[self.keys.workers],
                             args=[self.keys.prefix, int(c.heartbeat_ttl * 1000), c.max_attempts, c.failed_max,
                                   int(c.failed_ttl * 1000), skip])

    def unregister(self, worker: str) -> bool:
        k = self.keys
        return bool(self._unregister(keys=[k.workers, k.processing(worker), k.worker(worker)],
                                     args=[k.prefix, worker]))

    def wake_keys(self, queues) -> list:
        return [self.keys.wake(q) for q in queues]
