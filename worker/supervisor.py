"""The worker's main loop: claim, run in slots, record; heartbeats and recovery; pause; the shutdown sequence.

One loop, never blocked by a job or by Redis. Each turn:

1. ``slots.service()``   signals and kills that are due (stop escalation, timeouts, USR1, memory): no Redis
2. ``slots.collect()``   finished children become outcomes (``policy.decide``)
3. ``_redis_turn()``     one CYCLE call records every pending outcome, beats, and claims a job per free slot
4. ``_wait()``           select on the signal pipe, the fork server, the report pipes and the idle BLPOP

Redis calls go through a :class:`~worker.client.Link`, whose wait runs step 1 whenever a signal arrives, so a slow
Redis never delays a stop. Idle waiting is a BLPOP on the wake lists, on a second connection, left pending while
jobs run. Shutdown is three named steps: ``quiet`` (the first TERM/INT: stop claiming, put back claims not yet
started), ``wait_for`` (every running job gets the same escalation from the same moment, see ``slots.py``),
``bookkeeping`` (last outcomes and unregister on a connection bounded by the time left). The worker's standing in
Redis (registration, claims it holds outside its slots, recovery of dead workers, outages) is in ``membership.py``.
"""
from __future__ import annotations

import dataclasses
import os
import select
import time
from typing import Optional

import redis

from . import client, jobs, metrics, schedule, startup
from .api import Housekeeper
from .config import Config, ConfigError, redact_url
from .fetch import Broker, Outcome
from .forkserver import ForkServerError
from .membership import Membership
from .policy import Decision, bad, decide, unknown
from .signals import SignalState
from .slots import SlotTable

IDLE_POLL = 1.0  # longest idle block: entries pushed without a wake token, and pause changes, are seen this fast
STALL = 1.0      # a Redis call slower than this (or failing) means Redis stalled: recovery waits a full TTL after
TIDY_EVERY = 0.1  # while jobs flow, CYCLE moves due scheduled jobs and rings for idle workers at most this often


class Supervisor(Membership):
    """Runs until stopped (or, in burst mode, until the queues are empty). :meth:`run` returns the exit code."""

    def __init__(self, cfg: Config, broker: Broker, log, burst: bool = False):
        self.cfg, self.burst, self.log = cfg, burst, log
        self.name = cfg.worker_name()
        self.metrics = metrics.Sampler(cfg, self.name)  # l2met sample# lines, one worker per METRICS_INTERVAL
        self.housekeeper = Housekeeper(cfg)  # FAILED_TTL trim + the dashboard's minute samples (worker/api.py)
        self.sig = SignalState(hard_exit_after=cfg.hard_exit_after, grace=cfg.term_grace)
        self.slots = SlotTable(cfg, self.sig, log)
        self.broker = broker
        self.waiter = client.Waiter(client.connect(cfg, timeout=cfg.redis_timeout + IDLE_POLL, retries=0,
                                                   name="worker-wait"))
        self.pending: list = []        # outcomes not yet recorded
        self.parked: list = []         # outcomes held back: a key they need is wrong-typed (membership._refused)
        self._park_until = 0.0
        self._wrong_seen: dict = {}    # wrong-typed key -> when it may be logged again
        self._cleared: list = []       # slots whose saved checkpoint goes with their finished job
        self.adopted: list = []        # claims found in our processing list (reply lost), not yet running
        self.fatal: Optional[str] = None
        self.exit_code = 0
        self.processed = 0
        self._registered = self._resync = self._drained = self._suspects = False
        self._claim = True             # a claim is worth trying now (startup, a wake token, a poll, a resume)
        self._next_beat = self._next_recover = self._retry_at = self._quiet_until = 0.0
        self._idle_until = self._next_tidy = 0.0
        self._started = 0.0               # when we registered (time.time), shown by status
        self._short = True             # the last claim came up short (or none yet): idle, so every call tidies
        self._outage = 0
        self._shown_stop = False
        self._paused = False
        self.ticker: Optional[schedule.Ticker] = None  # periodic jobs this worker checks (none in burst mode)
        self.max_outage = 60.0         # a burst worker gives up after Redis is unreachable this long (--max-outage)
        self._outage_since: Optional[float] = None

    # --- main loop ---
    def run(self) -> int:
        self.sig.install()
        self.broker.link = client.Link(self.broker.r, self.sig.wake_r, self.slots.service, self.slots.due)
        if not self._start_server():
            return self._exit()
        if not self.burst:
            self.ticker = schedule.Ticker.from_meta(self.slots.meta, self.broker, self.log)
        cfg = self.cfg
        self.log.info("worker.start", redis=redact_url(cfg.redis_url), **startup.fields(cfg, self.slots.meta),
                      pid=os.getpid(), concurrency=cfg.concurrency, window=cfg.shutdown_window,
                      term_timeout=cfg.term_timeout, grace=cfg.term_grace, burst=self.burst or None)
        startup.warn(cfg, self.slots.meta, self.log)
        while True:
            self.slots.service()
            self.sig.announce(self.log)
            for slot in self.slots.collect():
                self._finished(slot)
            if self.sig.stopping or self.sig.quit:  # quiet: claims not started go back
                self._give_back_adopted()
            if self._done():
                break
            if self.slots.server_late():
                self._fatal("cannot start jobs: the fork server did not start in time")
            if self.slots.broken:
                self._fatal(self.slots.broken)
            self._redis_turn()
            if self._done():  # e.g. a burst worker that just found the queues empty
                break
            self._wait()
        return self._exit()

    def _done(self) -> bool:
        if self.slots.busy():
            return False
        if self.sig.stopping or self.sig.quit or self.fatal:
            return True
        # a burst worker that saw a late worker waits for its grace: its jobs may be ours to run
        return self.burst and self._drained and not self.pending and not self.adopted and not self._suspects

    def _give_back_adopted(self) -> None:
        """Claims found in our processing list (a lost reply) and never started go back to their queues."""
        self.pending += [Outcome.requeue(raw, jobs.queue_of(raw, self._fallback_queue()), -1)  # no slot
                         for raw in self.adopted]
        self.adopted = []

    def _fallback_queue(self) -> str:
        return "default" if self.cfg.all_queues else self.cfg.queues[0]

    def _start_server(self) -> bool:
        """Start the fork server and wait for it to import the app (interruptible: a stop ends the wait)."""
        self.slots.start_server()
        while not self.slots.ready:
            if self.sig.stopping or self.sig.quit:
                return False
            try:
                self.slots.forks.frames()
            except ForkServerError as exc:
                err = self.slots.forks.error
                if err:  # JOB_MODULES cannot be imported: a config error, before any connection
                    raise ConfigError(err) from None
                self._fatal(f"cannot start jobs: {exc}")
                return False
            if self.slots.server_late():
                self._fatal("cannot start jobs: the fork server did not start in time")
                return False
            if not self.slots.ready:
                self._select([self.slots.forks.fileno()], 1.0)
        return True

    def _fatal(self, reason: str) -> None:
        if not self.fatal:
            self.fatal = reason
            self.exit_code = 1
            self.log.error("worker.fatal", error=reason)

    # --- outcomes ---
    def _finished(self, slot) -> None:
        if slot.saved is not None:
            self._cleared.append(slot.index)
        if slot.lost:
            pass  # another worker has the job now (see _claims_lost): nothing to record
        elif slot.unstarted:  # never reached a child: it goes back as it was
            self.pending.append(Outcome.requeue(slot.raw, slot.queue, slot.index))
        else:
            try:
                d = decide(slot.result(self.cfg.job_max_memory_mb), slot.raw, slot.doc, slot.queue, slot.index,
                           slot.retries, self.name, slot.checkpoint, slot.max_interruptions, slot.result_ttl,
                           self.cfg.max_attempts)
            except Exception as exc:  # a runtime bug (or data no check foresaw) costs this job, never the worker
                job_id = jobs.loose_id(slot.raw)
                self.log.error("job.runtime_error", job=job_id, error=f"{type(exc).__name__}: {exc}")
                d = bad(slot.raw, job_id, slot.queue, self.name, f"worker could not record the outcome: "
                        f"{type(exc).__name__}: {exc}", slot.index)
            if slot.claimed_ms:  # its started_at, as the claim's reply gave it (spares the script a read)
                d = dataclasses.replace(d, outcome=dataclasses.replace(d.outcome, started_ms=slot.claimed_ms))
            if d.event == "job.done":
                self.processed += 1
            if d.event == "shutdown.job_put_back":
                d.fields["elapsed"] = self._elapsed()
            self._note(d)
        slot.clear()

    def _note(self, d: Decision) -> None:
        for level, event, fields in d.notes:
            getattr(self.log, level)(event, **fields)
        getattr(self.log, d.level)(d.event, **d.fields)
        self.pending.append(d.outcome)

    def _start(self, index: int, raw: str, queue: str, claimed_ms: int = 0) -> None:
        """Run a claimed entry in slot ``index``, or record why it cannot run."""
        try:
            doc = jobs.parse(raw, self.cfg.max_payload)
        except jobs.BadJob as exc:
            self._note(bad(raw, jobs.loose_id(raw), queue, self.name, str(exc), index))
            return
        meta = self.slots.meta.get(doc["name"])
        if meta is None:  # a rolling deploy: put back for UNKNOWN_JOB_GRACE, then failed (policy.unknown)
            self._note(unknown(raw, doc, queue, index, self.name, self.cfg.unknown_job_grace))
            return
        if not self.slots.ready:  # the fork server was just replaced (a failed hand-over in this same turn)
            self.pending.append(Outcome.requeue(raw, queue, index))
            return
        timeout = meta["timeout"] if meta["timeout"] is not None else self.cfg.job_timeout
        retries = meta["retries"] if meta["retries"] is not None else self.cfg.job_retries
        limit = meta.get("max_interruptions")
        limit = limit if limit is not None else self.cfg.max_interruptions
        self.log.debug("job.start", job=doc["id"], name=doc["name"], queue=queue, slot=index)
        try:
            self.slots.start(index, raw, doc, queue, timeout, retries, limit, meta.get("result_ttl"))
            self.slots.slots[index].claimed_ms = claimed_ms
        except ForkServerError:
            pass  # collect() writes it off as unstarted: put back

    # --- Redis ---
    def _can_claim(self) -> bool:
        sig = self.sig
        return not (sig.stopping or sig.quit or sig.paused or self.fatal) and bool(self.slots.free())

    def _redis_turn(self) -> None:
        now = time.monotonic()
        if now < self._retry_at:
            return
        t0 = now
        try:
            if not self._registered:
                self._register()
                warning = self.broker.check_server()
                if warning:
                    self.log.warning("redis.eviction_policy", note=warning)
                self._recover()
            if self._resync:
                self._adopt()
            if self.ticker and (self.sig.stopping or self.sig.quit or self.fatal):
                self.ticker = None  # a stopping worker enqueues no more ticks, and waits for none
            elif self.ticker and self.ticker.due():
                self._guarded(self.ticker.run)  # claims and enqueues the periodic jobs whose tick is due
            while self.adopted and self._can_claim():
                raw = self.adopted.pop(0)
                queue = jobs.queue_of(raw, self._fallback_queue())
                self.log.warning("job.adopted", job=jobs.loose_id(raw), queue=queue,
                                 reason="claimed by a call whose reply was lost")
                self._start(self.slots.free()[0], raw, queue)
            if self._paused != self.sig.paused:
                self._paused = self.sig.paused
                self._claim = True
            free = self.slots.free() if self._can_claim() and not self.adopted else []
            claim = free if (self._claim or self.pending or now >= self._idle_until) else []
            stop_news = (self.sig.stopping or self.sig.quit) and not self._shown_stop
            if self.pending or claim or now >= self._next_beat or stop_news:
                self._cycle(claim)
            now = time.monotonic()
            if now - t0 > STALL:  # this turn's calls were slow: Redis stalled; owners get to beat first
                self._quiet_until = now + self.cfg.heartbeat_ttl
            if now >= self._next_recover and now >= self._quiet_until:
                self._recover()
            self._guarded(self.metrics.maybe_sample, self.broker, self.log, now, self.name)
            self._guarded(self.housekeeper.maybe_run, self.broker, self.log, now, self.name)
            self._outage_over()
            self._outage_since = None
        except redis.RedisError as exc:
            self._resync = True  # the failed call may have run: check our processing list when Redis is back
            self._redis_down(exc)
            self._bounded_outage()

    def _bounded_outage(self) -> None:
        """A burst worker (CI, a one-off dyno) does not retry for ever: past ``max_outage`` it exits 1."""
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
        if self.burst and now - self._outage_since >= self.max_outage:
            self._fatal(f"Redis at {redact_url(self.cfg.redis_url)} unreachable for {now - self._outage_since:.0f} s "
                        f"(--max-outage {self.max_outage:g})")

    def _guarded(self, fn, *args) -> None:
        """Run an extra (metrics, schedules) so that nothing but a Redis error escapes it: a bug or odd data there
        is logged and costs that extra, never the loop that runs the jobs."""
        try:
            fn(*args)
        except redis.RedisError:
            raise
        except Exception as exc:
            self.log.error("worker.extra_failed", what=getattr(fn, "__qualname__", str(fn)),
                           error=f"{type(exc).__name__}: {exc}")

    def _cycle(self, claim: list) -> None:
        sig = self.sig
        mode = "stopping" if sig.stopping else ("paused" if sig.paused and not self.slots.busy() else "")
        self._unpark()
        outcomes = self.pending
        busy = self.slots.busy()
        progress = self.slots.progress()  # running jobs' checkpoints not yet in Redis (for recovery after a kill)
        now = time.monotonic()
        beat = now >= self._next_beat or mode != ""  # a stopping/paused worker's state goes out with a beat
        tidy = self._short or now >= self._next_tidy
        c = self.broker.cycle(self.name, outcomes, claim, busy, mode, [(i, "") for i in self._cleared] + progress,
                              beat=beat, tidy=tidy)
        while c.refused:  # a key it had to write is wrong-typed: nothing was written (lua.CYCLE)
            outcomes = self._refused(*c.refused, outcomes)
            if outcomes is None:
                return
            self.pending = outcomes
            c = self.broker.cycle(self.name, outcomes, claim, busy, mode,
                                  [(i, "") for i in self._cleared] + progress, beat=beat, tidy=tidy)
        for key in c.odd:
            self._wrong_type(key)
        if c.lost:  # nothing was recorded: restore what Redis lost of ours, then the same call again
            self._restore()
            c = self.broker.cycle(self.name, outcomes, claim, busy, mode,
                                  [(i, "") for i in self._cleared] + progress, beat=True, tidy=tidy)
            if c.lost:
                raise redis.ResponseError("Redis lost its data again while the worker restored its claims")
        self.pending, self._cleared = [], []
        self.slots.saved(progress)
        self._shown_stop = sig.stopping or sig.quit
        if beat:
            self._next_beat = now + self.cfg.heartbeat_interval
        if tidy:
            self._next_tidy = now + TIDY_EVERY
        if claim:
            self._short = len(c.claims) < len(claim)
        ours = busy - self.slots.unlisted() + len(c.claims) if c.held >= 0 else 0  # what our list should hold
        if c.held > ours:  # (-1 between beats: checked once per interval)
            self._resync = True  # more in our list than we know of: a lost reply left a claim behind
        lost = bool(c.recovered) or 0 <= c.held < ours + len(self.adopted)  # taken for dead, or lost by Redis
        for cl in c.claims:
            if sig.stopping or sig.quit:  # claimed while a stop arrived: hand it straight back, never started
                self.pending.append(Outcome.requeue(cl.payload, cl.queue, cl.slot))
            else:
                self._start(cl.slot, cl.payload, cl.queue, cl.at)
        if lost:
            self._claims_lost(outcomes, bool(c.recovered))
        if claim and len(c.claims) < len(claim):  # the queues ran dry: wait for a token, a poll or a due job
            self._claim = False
            self._drained = not self.slots.busy()
            # next_due is counted on Redis's clock (the one that moves scheduled jobs), never against ours
            wait = IDLE_POLL if c.next_due is None else min(IDLE_POLL, max(0.01, c.next_due / 1000))
            self._idle_until = time.monotonic() + wait
            queues = c.queues if self.cfg.all_queues else self.cfg.queues
            if queues and not self.burst:
                self.waiter.arm(self.broker.wake_keys(queues), wait)
        elif claim:
            self._claim = True

    # --- waiting ---
    def _wait(self) -> None:
        now = time.monotonic()
        redis_at = self._next_beat  # the next thing to do in Redis: beat, recover, claim, record, tick
        if self._registered:
            redis_at = min(redis_at, max(self._next_recover, self._quiet_until))
        if self._can_claim() and not self.waiter.armed:
            redis_at = min(redis_at, self._idle_until)
        if self.pending:
            redis_at = now
        if self.parked:
            redis_at = min(redis_at, self._park_until)
        if self.ticker:
            redis_at = min(redis_at, self.ticker.next_check)
        # Redis is down until the next attempt: nothing there can happen sooner (a beat overdue through an outage
        # must not turn this wait into a busy loop)
        redis_at = max(redis_at, self._retry_at)
        if self.waiter.armed and now > self.waiter.since + self.waiter.timeout + self.cfg.redis_timeout:
            self.waiter.cancel()  # its answer never came (a dead connection): poll again, and treat it as a stall
            self._claim = True
            self._quiet_until = now + self.cfg.heartbeat_ttl
        waiter = self.waiter.fileno() if self.waiter.armed else None
        if waiter is not None:
            redis_at = min(redis_at, self.waiter.since + self.waiter.timeout + self.cfg.redis_timeout)
        while True:  # a job's start and its report before its exit status need no turn of the loop: wait on
            at = min(time.monotonic() + self.slots.due(), redis_at)
            fds = self.slots.fds() + ([waiter] if waiter is not None else [])
            ready = self._select(fds, max(0.0, at - time.monotonic()))
            if not ready or self.sig.wake_r in ready or waiter in ready or self.slots.poll() \
                    or time.monotonic() >= at:
                break
        if self.waiter.armed and (waiter in ready or self.sig.stopping or self.sig.quit):
            self._woken()

    def _woken(self) -> None:
        """The idle BLPOP answered (a wake token, or its timeout), or a stop makes it moot."""
        if self.sig.stopping or self.sig.quit:
            self.waiter.cancel()
            return
        t0 = self.waiter.since
        try:
            got = self.waiter.result()
        except redis.RedisError as exc:
            self._redis_down(exc)
            return
        if time.monotonic() - t0 > self.waiter.timeout + STALL:
            self._quiet_until = time.monotonic() + self.cfg.heartbeat_ttl
        self._claim = True
        if got and not self._can_claim():  # a doorbell we cannot answer: ring it again for another worker
            try:
                self.broker.wake([got[0].split(":wake:", 1)[-1]])
            except redis.RedisError:
                pass

    def _select(self, fds, timeout: float) -> list:
        try:
            ready, _, _ = select.select([self.sig.wake_r, *fds], [], [], timeout)
        except InterruptedError:
            ready = []
        if self.sig.wake_r in ready:
            self.sig.drain()
        return ready

    # --- shutdown ---
    def _elapsed(self):
        return round(time.monotonic() - self.sig.stop_at, 3) if self.sig.stop_at is not None else None

    def _exit(self) -> int:
        """``bookkeeping``: record what is left on a connection bounded by the time left, unregister, go."""
        sig = self.sig
        sig.announce(self.log)
        self.waiter.cancel()
        broker = self.broker
        if sig.stopping:  # a hung Redis must not keep us past the window; what cannot be written is recovered later
            left = sig.stop_at + self.cfg.hard_exit_after - 0.1 - time.monotonic()
            broker.r.close()
            broker = Broker(client.connect(self.cfg, timeout=max(0.05, left / 2), retries=0, name="worker-exit"),
                            self.cfg)
            broker.epoch = self.broker.epoch
        self._give_back_adopted()  # adopted in the last turn (its reply arrived as the stop did): never started
        self.pending, self.parked = self.parked + self.pending, []  # one last try; else they stay claimed
        try:
            if self.pending and self._registered:
                mode = "stopping" if sig.stopping else ""
                c = broker.cycle(self.name, self.pending, (), 0, mode)
                if c.lost:  # Redis lost our claims: put them back
                    self._restore(broker)
                    c = broker.cycle(self.name, self.pending, (), 0, mode)
                while c.refused:  # what needs a wrong-typed key stays claimed (recovered later); the rest lands
                    rest = self._refused(*c.refused, self.pending)
                    if not rest:
                        break
                    self.pending = rest
                    c = broker.cycle(self.name, rest, (), 0, mode)
            if self._registered:
                broker.unregister(self.name)
        except redis.RedisError as exc:
            self.log.error("shutdown.bookkeeping_failed", error=f"{type(exc).__name__}: {exc}",
                           note="unacknowledged jobs stay in the processing list and will be recovered")
        finally:
            broker.r.close()
            self.waiter.close()
            # a fork server that does not leave at once (stopped) is killed in time for our own exit
            left = sig.stop_at + self.cfg.hard_exit_after - 0.1 - time.monotonic() if sig.stopping else 2.0
            self.slots.close(max(0.05, min(1.0, left / 2)))
        # Our handlers stayed in place through the bookkeeping above (a TERM there arms the watchdog, whatever made
        # us exit); from here a late TERM (Heroku may repeat it) must not kill the interpreter's own shutdown.
        sig.ignore_stops()
        reason = "signal" if sig.stopping else "quit" if sig.quit else "fatal" if self.fatal else "burst"
        self.log.info("worker.exit", processed=self.processed, elapsed=self._elapsed(), reason=reason)
        return self.exit_code if not sig.stopping else 0
