"""The worker's standing in Redis, a part the :class:`~worker.supervisor.Supervisor` owns (Sidekiq's
``launcher.rb``, which owns the heartbeat): its name and registration (and registering again, after Redis lost its
data or another worker took us for dead), its timers (heartbeat, recovery, the quiet after a stall, the retry after
an outage), the claims we hold that the loop did not start (``adopted``: a lost reply) or that are no longer ours
(recovered while we stalled), outcomes held back by a wrong-typed key (``parked``), recovering dead workers, and
Redis outages.

It reads the slot table (the jobs it holds) and nothing else of the supervisor: what the supervisor's loop has in
hand (the outcomes not yet recorded) is passed in, and what the loop should do next is returned.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Optional

import redis

from . import client, jobs
from .config import redact_url
from .fetch import Broker, Op
from .policy import Kill
from .slot import Listing


class Membership:
    """See the module's docstring. Timers are ``time.monotonic()`` values."""

    def __init__(self, cfg, broker: Broker, log, slots, name: str):
        self.cfg, self.broker, self.log, self.slots = cfg, broker, log, slots
        self.name = name
        self.registered = False
        self.started = 0.0              # when we registered (time.time), shown by status
        self.next_beat = 0.0            # heartbeat: the next beat is due
        self.next_recover = 0.0         # recovery: the next pass over dead workers is due
        self.quiet_until = 0.0          # after a stall: owners get to beat first, recovery waits a full TTL
        self.retry_at = 0.0             # Redis is down (or a key blocks every call): no call before this
        self.park_until = 0.0           # parked outcomes are tried again then
        self.resync = False             # look in our processing list for claims whose reply was lost
        self.suspects = False           # a late worker is in its grace: its jobs may come back to the queues
        self.adopted: list = []         # claims found in our processing list (reply lost), not yet running
        self.parked: list = []          # outcomes held back: a key they need is wrong-typed (refused)
        self.outage = 0                 # failed attempts in a row
        self.outage_since: Optional[float] = None
        self._wrong_seen: dict = {}     # wrong-typed key -> when it may be logged again
        self._name_checked = False
        self._orphan_cursor = 0

    # --- timers ---
    def beat_due(self, now: float) -> bool:
        return now >= self.next_beat

    def beaten(self, now: float) -> None:
        self.next_beat = now + self.cfg.heartbeat_interval

    def recovery_due(self, now: float) -> bool:
        return now >= self.next_recover and now >= self.quiet_until

    def stalled(self, now: float) -> None:
        """A call was slow, or an answer never came: Redis stalled, so owners get a full TTL to beat first."""
        self.quiet_until = now + self.cfg.heartbeat_ttl

    def next_call(self) -> float:
        """When the next beat or recovery pass is due (monotonic)."""
        at = self.next_beat
        if self.registered:
            at = min(at, max(self.next_recover, self.quiet_until))
        if self.parked:
            at = min(at, self.park_until)
        return at

    def claims_lost(self, sent: list, taken_for_dead: bool) -> None:
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
            if s.job.raw in held:
                held.remove(s.job.raw)
            elif s.job.doc.get("id") and s.job.id in gone:  # ('' marks a recovery; it names no job)
                s.listing = Listing.LOST
                s.kill(Kill.LOST)  # (a no-op if it is being killed already, for its timeout say)
                self.log.warning("job.claim_lost", job=s.job.id, name=s.job.name, slot=s.index,
                                 pid=s.child.pid, reason="recovered by another worker while this one did not beat; "
                                                   "its run here is killed and not recorded")
            else:
                s.listing = Listing.MISSING
                self.log.error("redis.claim_missing", job=s.job.id, name=s.job.name, slot=s.index,
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

    def adopt(self, pending: list) -> None:
        """Take the claims in our processing list that nothing holds (``pending``: outcomes not yet recorded)."""
        held = list(self.broker.claimed(self.name))
        for raw in [s.job.raw for s in self.slots.slots if s.busy] + [o.payload for o in pending + self.parked] \
                + self.adopted:
            if raw in held:
                held.remove(raw)
        self.adopted += held
        self.resync = False

    def register(self) -> None:
        # a previous incarnation with our $DYNO and pid: never share its keys (checked once: after a failed attempt
        # of ours, the keys in use are our own)
        if not self._name_checked and self.broker.name_in_use(self.name):
            self.name = f"{self.name}:{os.urandom(3).hex()}"
            self.log.bound["worker"] = self.name
        self._name_checked = True
        self.started = time.time()
        self.broker.register(self.name, self._info())
        self.registered = True
        self.beaten(time.monotonic())

    def _info(self) -> dict:
        cfg = self.cfg
        return {"host": socket.gethostname(), "pid": os.getpid(), "dyno": cfg.dyno or "",
                "concurrency": cfg.concurrency, "queues": ",".join(cfg.queues), "started": self.started,
                "state": "busy" if self.slots.busy() else "idle"}

    def restore(self, pending: list, broker: Optional[Broker] = None) -> None:
        """Redis lost its data since we registered (P:epoch is gone or another): our registration and processing
        list went with it, while we still hold jobs. Register again and put their claims back, so that they are
        recorded, put back on a stop, or recovered if this dyno dies, as if nothing had happened. ``broker``: the
        exit's own connection, in the last bookkeeping; ``pending``: outcomes not yet recorded."""
        running = [s for s in self.slots.slots if s.busy and not s.lost]
        held = [s.job.raw for s in running] + [o.payload for o in pending + self.parked] + self.adopted
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
                job, i = s.job, s.index
                info.update({f"job:{i}": job.raw, f"started:{i}": job.claimed_ms or int(time.time() * 1000),
                             f"queue:{i}": job.queue})  # where recovery puts it back (lua.CYCLE)
                s.saved = None
        return info

    def recover(self) -> bool:
        """One recovery pass; True if jobs went back to the queues (worth a claim now, even for a burst worker)."""
        self.next_recover = time.monotonic() + 2 * self.cfg.heartbeat_interval
        try:
            done = self.broker.recover(skip=self.name)
        except redis.ResponseError as exc:  # a script error: say so, and let the next pass try again
            self.log.error("recovery.error", error=f"{type(exc).__name__}: {exc}")
            return False
        for item in done:
            what, _, job_id = item.partition(":")
            if what == "wrongtype":  # (job_id: the key) nothing of it was recovered
                self.wrong_type(job_id)
                continue
            self.log.warning("recovery." + what, job=job_id, reason="owner's deadline and grace passed")
        self.suspects = done.wait is not None
        if done.wait is not None:  # a late worker gets its grace; look again the moment it ends
            self.next_recover = min(self.next_recover, time.monotonic() + done.wait + 0.01)
        self._adopt_orphans()
        return bool(done)

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
            # (on a cluster, client.SlotClient sends it to the node that holds the key space's one slot)
            cursor, found = r.scan(self._orphan_cursor, match=k.processing("*"), count=1000)
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
                    self.next_recover = time.monotonic()  # judge it on the next pass
        except redis.ResponseError as exc:  # a wrong-typed key: named once per interval elsewhere
            if "WRONGTYPE" not in str(exc):
                raise

    # --- wrong-typed keys (issue 27 item 1): named, once per HEARTBEAT_INTERVAL each, never taken for an outage ---
    def refused(self, key: str, kind: str, outcomes: list) -> Optional[list]:
        """A CYCLE call wrote nothing: ``key`` (which it had to write) is a ``kind``. The outcomes that need that key
        (a retry: P:scheduled; a failure: P:failed, P:failed:data) are held back (``parked``) and tried again after
        HEARTBEAT_INTERVAL, their claims staying in our processing list (recovered if this worker dies); returns
        the outcomes to send without them, or None if the key blocks every call (our processing list, P:epoch):
        then nothing is sent before the next interval."""
        self.wrong_type(key, kind)
        k = self.broker.keys
        needs = {Op.RETRY: (k.scheduled,), Op.FAIL: (k.failed, k.failed_data)}
        held = [o for o in outcomes if key in needs.get(o.op, ())]
        if not held:
            self.retry_at = time.monotonic() + self.cfg.heartbeat_interval
            return None
        self.parked += held
        self.park_until = time.monotonic() + self.cfg.heartbeat_interval
        return [o for o in outcomes if o not in held]

    def unpark(self, force: bool = False) -> list:
        """The parked outcomes, taken back once their interval is over (``force``: now, the last bookkeeping)."""
        if not (force or time.monotonic() >= self.park_until):
            return []
        out, self.parked = self.parked, []
        return out

    def wrong_type(self, key: str, kind: Optional[str] = None) -> None:
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

    def down(self, exc) -> None:
        """A Redis call failed with ``exc``: name a wrong-typed key, or count an outage and set when to try again."""
        if isinstance(exc, redis.ResponseError) and "WRONGTYPE" in str(exc):
            try:  # a key of the wrong type, not an outage: name it (or say what Redis said)
                found = self.broker.wrong_types(self.name, self.broker.wake_keys(self.cfg.queues))
            except redis.RedisError:
                found = []
            for key, kind in found or [("?", str(exc)[:200])]:
                self.wrong_type(key, kind)
            self.retry_at = time.monotonic() + self.cfg.heartbeat_interval
            return
        self.outage += 1
        # at least one attempt per HEARTBEAT_INTERVAL: after a stall, our beat must come within the grace others
        # give us (lua.RECOVER: interval + 1 s), not after a backoff of several seconds
        delay = min(client.outage_backoff().compute(self.outage), self.cfg.heartbeat_interval)
        if self.outage == 1 or self.outage % 10 == 0:
            self.log.error("redis.unavailable", error=f"{type(exc).__name__}: {exc}", retry_in=delay,
                           attempt=self.outage)
        now = time.monotonic()
        self.retry_at = now + delay
        self.quiet_until = now + delay + self.cfg.heartbeat_ttl

    def gave_up(self, max_outage: float) -> Optional[str]:
        """Why a burst worker gives up (Redis unreachable ``max_outage`` s in a row, ``--max-outage``), or None."""
        now = time.monotonic()
        if self.outage_since is None:
            self.outage_since = now
        if now - self.outage_since < max_outage:
            return None
        return (f"Redis at {redact_url(self.cfg.redis_url)} unreachable for {now - self.outage_since:.0f} s "
                f"(--max-outage {max_outage:g})")

    def last_connection(self, stop_at: Optional[float]) -> Broker:
        """The connection for the last bookkeeping: after a stop (``stop_at``), one whose calls end in time for our
        exit (a hung Redis must not keep us past the window; what cannot be written is recovered later)."""
        if stop_at is None:
            return self.broker
        left = stop_at + self.cfg.hard_exit_after - 0.1 - time.monotonic()
        timeout = max(0.05, left / 2)
        r = None
        if client.is_cluster(self.broker.r):  # the slot's node itself: no cluster client start-up (connect_node)
            try:
                r = client.connect_node(self.cfg, self.broker.r.node(), timeout=timeout, name="worker-exit")
            except Exception:  # noqa: BLE001 - the slot map has no node for the slot (a failover): a cluster client
                r = None
        if r is None:
            r = client.connect(self.cfg, timeout=timeout, retries=0, name="worker-exit")
        self.broker.r.close()
        broker = Broker(r, self.cfg)
        broker.epoch, broker.limits = self.broker.epoch, self.broker.limits
        return broker

    def up(self) -> None:
        """A Redis turn went through."""
        if self.outage:
            self.log.info("redis.reconnected", after_attempts=self.outage)
            self.outage = 0
        self.outage_since = None
