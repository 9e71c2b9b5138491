"""The worker's main loop: claim, run in slots, record; heartbeats and recovery; pause; the shutdown sequence.

One loop, never blocked by a job or by Redis. Each turn:

1. ``slots.service()``   signals and kills that are due (stop escalation, timeouts, USR1, memory): no Redis
2. ``slots.collect()``   finished children become outcomes (``policy.decide``)
3. ``_redis_turn()``     one CYCLE call records every pending outcome, beats, and claims a job per free slot
4. ``_wait()``           select on the signal pipe, the fork server, the report pipes and the idle BLPOP

Redis calls go through a :class:`~worker.client.Link`, whose wait runs step 1 whenever a signal arrives, so a slow
Redis never delays a stop. Idle waiting is a BLPOP on the wake lists, on a second connection, left pending while
jobs run. A stop is three methods: :meth:`Supervisor.quiet`, :meth:`Supervisor.wait_for` (the timeline every running
job gets: ``stops.py``) and :meth:`Supervisor.bookkeeping`. The worker's standing in Redis (registration, its timers,
claims it holds outside its slots, recovery of dead workers, outages) is a part it owns: ``membership.py``.
"""
from __future__ import annotations

import os
import select
import time
from typing import Optional

import redis

from . import client, jobs, metrics, schedule, startup
from .api import Housekeeper
from .config import Config, ConfigError, redact_url
from .fetch import Broker, Outcome
from .lua import calls as wire
from .forkserver import ForkServerError
from .membership import Membership
from .ledger import Ledger
from .signals import SignalState
from .slots import SlotTable

IDLE_POLL = 1.0  # longest idle block: entries pushed without a wake token, and pause changes, are seen this fast
STALL = 1.0      # a Redis call slower than this (or failing) means Redis stalled: recovery waits a full TTL after
TIDY_EVERY = 0.1  # while jobs flow, CYCLE moves due scheduled jobs and rings for idle workers at most this often


class Supervisor:
    """Runs until stopped (or, in burst mode, until the queues are empty). :meth:`run` returns the exit code."""

    def __init__(self, cfg: Config, broker: Broker, log, burst: bool = False):
        self.cfg, self.burst, self.log = cfg, burst, log
        self.sig = SignalState(hard_exit_after=cfg.hard_exit_after, grace=cfg.term_grace)
        self.slots = SlotTable(cfg, self.sig, log)
        self.broker = broker
        self.member = Membership(cfg, broker, log, self.slots, cfg.worker_name())
        self.metrics = metrics.Sampler(cfg, self.name)  # l2met sample# lines, one worker per METRICS_INTERVAL
        self.housekeeper = Housekeeper(cfg)  # FAILED_TTL trim + the dashboard's minute samples (worker/api.py)
        self.waiter = client.Waiter(client.connect(cfg, timeout=cfg.redis_timeout + IDLE_POLL, retries=0,
                                                   name="worker-wait"))
        self.ledger = Ledger(cfg, log, self.slots, self.sig, self.member)  # claims into jobs, runs into outcomes
        self.fatal: Optional[str] = None
        self.exit_code = 0
        self._drained = False          # a burst worker's claim came up short with nothing running
        self._claim = True             # a claim is worth trying now (startup, a wake token, a poll, a resume)
        self._idle_until = self._next_tidy = 0.0
        self._short = True             # the last claim came up short (or none yet): idle, so every call tidies
        self._shown_stop = False
        self._paused = False
        self.ticker: Optional[schedule.Ticker] = None  # periodic jobs this worker checks (none in burst mode)
        self.max_outage = 60.0         # a burst worker gives up after Redis is unreachable this long (--max-outage)

    # the worker's name is its membership's (a test renames it, asks for a resync, registers without running)
    name = property(lambda self: self.member.name, lambda self, v: setattr(self.member, "name", v))
    _resync = property(lambda self: self.member.resync, lambda self, v: setattr(self.member, "resync", v))
    _register = property(lambda self: self.member.register)

    @property
    def leaving(self) -> bool:
        """A stop (TERM/INT) or a QUIT arrived: claim nothing more, finish or stop what runs, then exit."""
        return self.sig.stopping or self.sig.quit

    # --- main loop ---
    def run(self) -> int:
        self.sig.install()
        self.broker.link = client.Link(self.broker.r, self.sig.wake_r, self.slots.service, self.slots.due)
        if not self._start_server():
            return self.bookkeeping()
        self.broker.limits, self.broker.served = wire.limits(self.slots.meta), wire.served(self.slots.meta)
        if not self.burst:
            self.ticker = schedule.Ticker.from_meta(self.slots.meta, self.broker, self.log)
        cfg = self.cfg
        self.log.info("worker.start", redis=redact_url(cfg.redis_url), **startup.fields(cfg, self.slots.meta),
                      pid=os.getpid(), concurrency=cfg.concurrency, window=cfg.shutdown_window,
                      term_timeout=cfg.term_timeout, grace=cfg.term_grace, burst=self.burst or None)
        startup.warn(cfg, self.slots.meta, self.log)
        while not self._turn():
            pass
        return self.bookkeeping()

    def _turn(self) -> bool:
        """One turn of the loop (see the module's docstring); True when the worker is done."""
        self.slots.service()
        self.sig.announce(self.log)
        for slot in self.slots.collect():
            self.ledger.finished(slot)
        if self.leaving:
            self.quiet()
        if self._done():
            return True
        if self.slots.server_late():
            self._fatal("cannot start jobs: the fork server did not start in time")
        if self.slots.broken:
            self._fatal(self.slots.broken)
        self._redis_turn()
        if self._done():  # e.g. a burst worker that just found the queues empty
            return True
        self._wait()
        return False

    def _done(self) -> bool:
        if self.wait_for():
            return False
        if self.leaving or self.fatal:
            return True
        # a burst worker that saw a late worker waits for its grace: its jobs may be ours to run
        m = self.member
        return self.burst and self._drained and not self.ledger.pending and not m.adopted and not m.suspects

    def _fallback_queue(self) -> str:
        return "default" if self.cfg.all_queues else self.cfg.queues[0]

    def _start_server(self) -> bool:
        """Start the fork server and wait for it to import the app (interruptible: a stop ends the wait)."""
        self.slots.start_server()
        while not self.slots.ready:
            if self.leaving:
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

    # --- Redis ---
    def _can_claim(self) -> bool:
        return not (self.leaving or self.sig.paused or self.fatal) and bool(self.slots.free())

    def _redis_turn(self) -> None:
        m = self.member
        now = time.monotonic()
        if now < m.retry_at:
            return
        t0 = now
        try:
            if not m.registered:
                self._first_contact()
            if m.resync:
                m.adopt(self.ledger.pending)
            self._tick()
            self._start_adopted()
            if self._paused != self.sig.paused:
                self._paused = self.sig.paused
                self._claim = True
            free = self.slots.free() if self._can_claim() and not m.adopted else []
            claim = free if (self._claim or self.ledger.pending or now >= self._idle_until) else []
            stop_news = self.leaving and not self._shown_stop
            if self.ledger.pending or claim or m.beat_due(now) or stop_news:
                self._cycle(claim)
            now = time.monotonic()
            if now - t0 > STALL:  # this turn's calls were slow: Redis stalled; owners get to beat first
                m.stalled(now)
            if m.recovery_due(now):
                self._recover()
            self._extras(now)
            m.up()
        except redis.RedisError as exc:
            m.resync = True  # the failed call may have run: check our processing list when Redis is back
            m.down(exc)
            gave_up = self.member.gave_up(self.max_outage) if self.burst else None
            if gave_up:  # a burst worker (CI, a one-off dyno) does not retry for ever: exit 1
                self._fatal(gave_up)

    def _first_contact(self) -> None:
        self.member.register()
        warning = self.broker.check_server()
        if warning:
            self.log.warning("redis.eviction_policy", note=warning)
        self._recover()

    def _recover(self) -> None:
        if self.member.recover():  # jobs went back to the queues: worth a claim now (a burst worker runs them too)
            self._claim, self._drained = True, False

    def _start_adopted(self) -> None:
        while self.member.adopted and self._can_claim():
            raw = self.member.adopted.pop(0)
            queue = jobs.queue_of(raw, self._fallback_queue())
            self.log.warning("job.adopted", job=jobs.loose_id(raw), queue=queue,
                             reason="claimed by a call whose reply was lost")
            self.ledger.start(self.slots.free()[0], raw, queue)

    def _tick(self) -> None:
        if self.ticker and (self.leaving or self.fatal):
            self.ticker = None  # a stopping worker enqueues no more ticks, and waits for none (quiet)
        elif self.ticker and self.ticker.due():
            self._guarded(self.ticker.run)  # claims and enqueues the periodic jobs whose tick is due

    def _extras(self, now: float) -> None:
        self._guarded(self.metrics.maybe_sample, self.broker, self.log, now, self.name)
        self._guarded(self.housekeeper.maybe_run, self.broker, self.log, now, self.name)

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
        m, sig = self.member, self.sig
        mode = "stopping" if sig.stopping else ("paused" if sig.paused and not self.slots.busy() else "")
        self.ledger.pending = m.unpark() + self.ledger.pending
        outcomes = self.ledger.pending
        busy = self.slots.busy()
        progress = self.slots.progress()  # running jobs' checkpoints not yet in Redis (for recovery after a kill)
        now = time.monotonic()
        beat = m.beat_due(now) or mode != ""  # a stopping/paused worker's state goes out with a beat
        tidy = self._short or now >= self._next_tidy

        def call(outcomes, beat=beat):
            return self.broker.cycle(self.name, outcomes, claim, busy, mode,
                                     [(i, "") for i in self.ledger.cleared] + progress, beat=beat, tidy=tidy)
        c = call(outcomes)
        while c.refused:  # a key it had to write is wrong-typed: nothing was written (lua.CYCLE)
            outcomes = m.refused(*c.refused, outcomes)
            if outcomes is None:
                return
            self.ledger.pending = outcomes
            c = call(outcomes)
        for key in c.odd:
            m.wrong_type(key)
        if c.lost:  # nothing was recorded: restore what Redis lost of ours, then the same call again
            m.restore(self.ledger.pending)
            c = call(outcomes, beat=True)
            if c.lost:
                raise redis.ResponseError("Redis lost its data again while the worker restored its claims")
        self.ledger.pending, self.ledger.cleared = [], []
        self.slots.saved(progress)
        self._shown_stop = self.leaving
        if beat:
            m.beaten(now)
        if tidy:
            self._next_tidy = now + TIDY_EVERY
        self._claimed(c, claim, busy, outcomes)

    def _claimed(self, c, claim: list, busy: int, sent: list) -> None:
        """After a CYCLE call: check what our processing list holds, start (or hand back) the claims, and wait for
        a token, a poll or a due job if the queues ran dry."""
        m = self.member
        if claim:
            self._short = len(c.claims) < len(claim)
        ours = busy - self.slots.unlisted() + len(c.claims) if c.held >= 0 else 0  # what our list should hold
        if c.held > ours:  # (-1 between beats: checked once per interval)
            m.resync = True  # more in our list than we know of: a lost reply left a claim behind
        lost = bool(c.recovered) or 0 <= c.held < ours + len(m.adopted)  # taken for dead, or lost by Redis
        for cl in c.claims:
            if self.leaving:  # claimed while a stop arrived: hand it straight back, never started (quiet)
                self.ledger.pending.append(Outcome.requeue(cl.payload, cl.queue, cl.slot))
            else:
                self.ledger.start(cl.slot, cl.payload, cl.queue, cl.at)
        if lost:
            m.claims_lost(sent, bool(c.recovered))
        self.slots.cancel(c.cancel)  # cancel(running=True), read at beats
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
        redis_at = self.member.next_call()  # the next thing to do in Redis: beat, recover, claim, record, tick
        if self._can_claim() and not self.waiter.armed:
            redis_at = min(redis_at, self._idle_until)
        if self.ledger.pending:
            redis_at = now
        if self.ticker:
            redis_at = min(redis_at, self.ticker.next_check)
        # Redis is down until the next attempt: nothing there can happen sooner (a beat overdue through an outage
        # must not turn this wait into a busy loop)
        redis_at = max(redis_at, self.member.retry_at)
        if self.waiter.armed and now > self.waiter.since + self.waiter.timeout + self.cfg.redis_timeout:
            self.waiter.cancel()  # its answer never came (a dead connection): poll again, and treat it as a stall
            self._claim = True
            self.member.stalled(now)
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
        if self.waiter.armed and (waiter in ready or self.leaving):
            self._woken()

    def _woken(self) -> None:
        """The idle BLPOP answered (a wake token, or its timeout), or a stop makes it moot."""
        if self.leaving:
            self.waiter.cancel()
            return
        t0 = self.waiter.since
        try:
            got = self.waiter.result()
        except redis.RedisError as exc:
            self.member.down(exc)
            return
        if time.monotonic() - t0 > self.waiter.timeout + STALL:
            self.member.stalled(time.monotonic())
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

    # --- a stop: quiet, wait_for, bookkeeping (the jobs' own timeline: stops.py) ---
    def quiet(self) -> None:
        """From the first TERM/INT (or a QUIT) on, every turn: claim nothing more (``_can_claim``), hand back the
        claims not yet started (adopted ones here; one that arrives with the stop, in ``_claimed``), enqueue no
        more periodic jobs."""
        self.ledger.give_back(self._fallback_queue())
        self.ticker = None

    def wait_for(self) -> bool:
        """True while jobs still run: the loop goes on, and ``slots.service`` takes each step of the stop timeline
        (``stops.STEPS``) for all of them at once, at its time; each finished one is recorded as it ends."""
        return self.slots.busy() > 0

    def bookkeeping(self) -> int:
        """The last step: record what is left, unregister, stop the fork server, go. Returns the exit code."""
        sig = self.sig
        sig.announce(self.log)
        self.waiter.cancel()
        broker = self.member.last_connection(sig.stop_at)
        # adopted in the last turn (its reply arrived as the stop did): never started
        self.ledger.give_back(self._fallback_queue())
        self.ledger.pending = self.member.unpark(force=True) + self.ledger.pending  # one last try, else claimed
        try:
            if self.ledger.pending and self.member.registered:
                self.ledger.record_last(broker, "stopping" if sig.stopping else "")
            if self.member.registered:
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
        self.log.info("worker.exit", processed=self.ledger.processed, elapsed=self.ledger.elapsed(), reason=reason)
        return self.exit_code if not sig.stopping else 0
