"""The worker's standing in Redis, a part of :class:`~worker.supervisor.Supervisor` kept apart from its loop:
registering (and again, after Redis lost its data or another worker took us for dead), the claims we hold that the
loop did not start (a lost reply) or that are no longer ours (recovered while we stalled), recovering dead workers,
and Redis outages.

Every method runs inside the loop's Redis turn and reads or sets the supervisor's state: ``name``, ``cfg``,
``log``, ``broker``, ``slots``, ``pending``, ``adopted``, and the loop's timers and flags (``_next_beat``,
``_next_recover``, ``_retry_at``, ``_quiet_until``, ``_resync``, ``_claim``, ``_drained``, ``_suspects``,
``_outage``, ``_registered``, ``_started``).
"""
from __future__ import annotations

import os
import socket
import time
from typing import Optional

import redis

from . import client, jobs
from .fetch import Broker, Op
from .policy import Kill


class Membership:
    """Mixed into :class:`~worker.supervisor.Supervisor` (see the module's docstring)."""

    def _claims_lost(self, sent: list, taken_for_dead: bool) -> None:
        """Our processing list holds less than the jobs we run, or another worker took us for dead.

        * A job whose id is in ``P:recovered:<w>`` was recovered by another worker, because we did not beat for
          HEARTBEAT_TTL and its grace (this process stalled, or Redis could not hear us): it is queued again or
          already running elsewhere. Our run of it is killed at once and records nothing, so two runs overlap no
          longer than the stall (and until our first beat after it). ``sent``: the outcomes the call that noticed
          had to record; those of recovered jobs took no effect, and the log says so.
        * Any other job missing from the list was lost by Redis without a recovery (a failover to a replica that
          had not seen the claim, eviction, a recovery that left no record): it runs on, as it did before this
          check, and its outcome will find no claim to record. Writing its claim back could make two (the
          failover may have put the job back in its queue); the log says which.

        ``taken_for_dead``: our registration was gone (with or without a record of what was recovered): we register
        again, which deletes the record."""
        held, gone = self.broker.claims_and_recovered(self.name)
        for o in sent:
            job_id = jobs.loose_id(o.payload)
            if job_id in gone:
                self.log.warning("job.claim_lost", job=job_id, slot=o.slot, outcome=o.op.value,
                                 reason="recovered by another worker while this one did not beat; this run's "
                                        "outcome is not recorded")
        for s in self.slots.slots:
            if not s.busy or s.unlisted:
                continue
            if s.raw in held:
                held.remove(s.raw)
            elif s.doc.get("id") and s.doc["id"] in gone:  # ('' marks a recovery; it names no job)
                s.lost = s.unlisted = True
                s.kill(Kill.LOST)  # (a no-op if it is being killed already, for its timeout say)
                self.log.warning("job.claim_lost", job=s.doc.get("id"), name=s.doc.get("name"), slot=s.index,
                                 pid=s.pid, reason="recovered by another worker while this one did not beat; "
                                                   "its run here is killed and not recorded")
            else:
                s.unlisted = True
                self.log.error("redis.claim_missing", job=s.doc.get("id"), name=s.doc.get("name"), slot=s.index,
                               note="gone from this worker's processing list without a recovery (a failover to "
                                    "a replica that missed it, eviction); it runs on, and its outcome cannot be "
                                    "recorded")
        for raw in list(self.adopted):
            if raw in held:
                held.remove(raw)
            elif jobs.loose_id(raw) in gone:
                self.adopted.remove(raw)  # never started here: the worker that recovered it has it
        if taken_for_dead:
            self.broker.register(self.name, self._registration())

    def _adopt(self) -> None:
        held = list(self.broker.claimed(self.name))
        for raw in [s.raw for s in self.slots.slots if s.busy] + [o.payload for o in self.pending + self.parked] \
                + self.adopted:
            if raw in held:
                held.remove(raw)
        self.adopted += held
        self._resync = False

    def _register(self) -> None:
        # a previous incarnation with our $DYNO and pid: never share its keys (checked once: after a failed attempt
        # of ours, the keys in use are our own)
        if not getattr(self, "_name_checked", False) and self.broker.name_in_use(self.name):
            self.name = f"{self.name}:{os.urandom(3).hex()}"
            self.log.bound["worker"] = self.name
        self._name_checked = True
        self._started = time.time()
        self.broker.register(self.name, self._info())
        self._registered = True
        self._next_beat = time.monotonic() + self.cfg.heartbeat_interval

    def _info(self) -> dict:
        cfg = self.cfg
        return {"host": socket.gethostname(), "pid": os.getpid(), "dyno": cfg.dyno or "",
                "concurrency": cfg.concurrency, "queues": ",".join(cfg.queues), "started": self._started,
                "state": "busy" if self.slots.busy() else "idle"}

    def _restore(self, broker: Optional[Broker] = None) -> None:
        """Redis lost its data since we registered (P:epoch is gone or another): our registration and processing
        list went with it, while we still hold jobs. Register again and put their claims back, so that they are
        recorded, put back on a stop, or recovered if this dyno dies, as if nothing had happened. ``broker``: the
        exit's own connection, in the last bookkeeping."""
        running = [s for s in self.slots.slots if s.busy and not s.lost]
        held = [s.raw for s in running] + [o.payload for o in self.pending + self.parked] + self.adopted
        self.log.error("redis.data_lost", held=len(held),
                       note="P:epoch changed: Redis restarted without persistence, or its data was replaced; "
                            "jobs queued before are gone, the ones this worker holds are claimed again")
        (broker or self.broker).restore(self.name, self._registration(), held)

    def _registration(self) -> dict:
        """Our worker hash, for registering again while jobs run: :meth:`_info` and what status and get_job show of
        each running job (its checkpoint goes with the next call)."""
        info = self._info()
        for s in self.slots.slots:
            if s.busy and not s.lost:
                info.update({f"job:{s.index}": s.raw, f"started:{s.index}": s.claimed_ms or int(time.time() * 1000),
                             f"queue:{s.index}": s.queue})  # where recovery puts it back (lua.CYCLE)
                s.saved = None
        return info

    def _recover(self) -> None:
        self._next_recover = time.monotonic() + 2 * self.cfg.heartbeat_interval
        try:
            done = self.broker.recover(skip=self.name)
        except redis.ResponseError as exc:  # a script error: say so, and let the next pass try again
            self.log.error("recovery.error", error=f"{type(exc).__name__}: {exc}")
            return
        for item in done:
            what, _, job_id = item.partition(":")
            if what == "wrongtype":  # (job_id: the key) nothing of it was recovered
                self._wrong_type(job_id)
                continue
            self.log.warning("recovery." + what, job=job_id, reason="owner's deadline and grace passed")
        if done:  # jobs went back to the queues: worth a claim now (a burst worker runs them too)
            self._claim, self._drained = True, False
        self._suspects = done.wait is not None
        if done.wait is not None:  # a late worker gets its grace; look again the moment it ends
            self._next_recover = min(self._next_recover, time.monotonic() + done.wait + 0.01)
        self._adopt_orphans()

    def _adopt_orphans(self) -> None:
        """A processing list whose owner has no ``P:workers`` entry is registered for RECOVER to judge.

        RECOVER finds dead workers through ``P:workers`` only, so an entry lost with that key (overwritten by
        another program, deleted to clear a wrong-typed key as ``redis.wrong_type`` advises) orphaned a dead
        worker's claims for good (found by the review of issue 27 item 1). Each recovery pass SCANs one step of
        the keyspace (COUNT 1000: bounded work, a full sweep over many passes) for ``P:processing:<w>`` and adds
        ``<w>`` with ``ZADD NX``, its deadline the one its hash last reported (``seen`` + ``ttl``), else now.
        Invariant: this never shortens a live worker's standing. NX leaves an existing entry alone; a live worker
        re-adds its own deadline at every beat, which resets RECOVER's mark; and a worker only counts as dead after
        RECOVER's grace from its first late sighting, as for any other entry."""
        k, r = self.broker.keys, self.broker.r
        try:
            cursor, found = r.scan(getattr(self, "_orphan_cursor", 0), match=k.processing("*"), count=1000)
            self._orphan_cursor = int(cursor)
            head = len(k.processing(""))
            for key in found:
                owner = key[head:]
                if owner == self.name or r.zscore(k.workers, owner) is not None:
                    continue
                seen, ttl = r.hmget(k.worker(owner), "seen", "ttl")
                sec, usec = r.time()
                try:
                    deadline = int(seen) + int(ttl)
                except (TypeError, ValueError):
                    deadline = sec * 1000 + usec // 1000
                if r.zadd(k.workers, {owner: deadline}, nx=True):
                    self.log.warning("recovery.orphan_registered", worker=owner, reason="its processing list had no "
                                     "P:workers entry")
                    self._next_recover = time.monotonic()  # judge it on the next pass
        except redis.ResponseError as exc:  # a wrong-typed key: named once per interval elsewhere
            if "WRONGTYPE" not in str(exc):
                raise

    # --- wrong-typed keys (issue 27 item 1): named, once per HEARTBEAT_INTERVAL each, never taken for an outage ---
    def _refused(self, key: str, kind: str, outcomes: list) -> Optional[list]:
        """A CYCLE call wrote nothing: ``key`` (which it had to write) is a ``kind``. The outcomes that need that key
        (a retry: P:scheduled; a failure: P:failed, P:failed:data) are held back (``parked``) and tried again after
        HEARTBEAT_INTERVAL, their claims staying in our processing list (recovered if this worker dies); returns
        the outcomes to send without them, or None if the key blocks every call (our processing list, P:epoch):
        then nothing is sent before the next interval."""
        self._wrong_type(key, kind)
        k = self.broker.keys
        needs = {Op.RETRY: (k.scheduled,), Op.FAIL: (k.failed, k.failed_data)}
        held = [o for o in outcomes if key in needs.get(o.op, ())]
        if not held:
            self._retry_at = time.monotonic() + self.cfg.heartbeat_interval
            return None
        self.parked += held
        self._park_until = time.monotonic() + self.cfg.heartbeat_interval
        return [o for o in outcomes if o not in held]

    def _unpark(self) -> None:
        if self.parked and time.monotonic() >= self._park_until:
            self.pending, self.parked = self.parked + self.pending, []

    def _wrong_type(self, key: str, kind: Optional[str] = None) -> None:
        now = time.monotonic()
        if now < self._wrong_seen.get(key, 0.0):
            return
        self._wrong_seen[key] = now + self.cfg.heartbeat_interval
        if kind is None:
            try:
                kind = self.broker.r.type(key)
            except redis.RedisError:
                kind = "?"
        self.log.error("redis.wrong_type", key=key, type=kind,
                       note="this key holds another type than the runtime's (keys.py); the jobs that need it wait "
                            "in their processing list: delete or rename the key")

    def _redis_down(self, exc) -> None:
        if isinstance(exc, redis.ResponseError) and "WRONGTYPE" in str(exc):
            try:  # a key of the wrong type, not an outage: name it (or say what Redis said)
                found = self.broker.wrong_types(self.name, self.broker.wake_keys(self.cfg.queues))
            except redis.RedisError:
                found = []
            for key, kind in found or [("?", str(exc)[:200])]:
                self._wrong_type(key, kind)
            self._retry_at = time.monotonic() + self.cfg.heartbeat_interval
            return
        self._outage += 1
        # at least one attempt per HEARTBEAT_INTERVAL: after a stall, our beat must come within the grace others
        # give us (lua.RECOVER: interval + 1 s), not after a backoff of several seconds
        delay = min(client.outage_backoff().compute(self._outage), self.cfg.heartbeat_interval)
        if self._outage == 1 or self._outage % 10 == 0:
            self.log.error("redis.unavailable", error=f"{type(exc).__name__}: {exc}", retry_in=delay,
                           attempt=self._outage)
        self._retry_at = time.monotonic() + delay
        self._quiet_until = time.monotonic() + delay + self.cfg.heartbeat_ttl

    def _outage_over(self) -> None:
        if self._outage:
            self.log.info("redis.reconnected", after_attempts=self._outage)
            self._outage = 0
