"""The worker's main loop: claim, fork, record; heartbeats and recovery; pause; the shutdown sequence.

One loop, one Redis connection. Each turn records the previous job's outcome and claims the next job in a single
script call. Signals are only recorded (``signals.py``); this loop reads them at the top of every turn, and every
wait is a ``select`` that a signal interrupts, so a stop is acted on within milliseconds whether the worker is idle,
busy or waiting for Redis to come back.
"""
from __future__ import annotations

import os
import select
import socket
import time
from typing import Optional

import redis

from . import client, jobs
from .config import Config, redact_url
from .failed import record as failed_record
from .fetch import Broker, Cycle, Outcome, backoff_delay
from .forkserver import ForkServerError
from .runner import Processor
from .signals import SignalState

IDLE_POLL = 1.0  # longest idle block: entries pushed without a wake token, and pause changes, are seen this fast
SIDE_TIMEOUT = 0.5  # bound on each Redis call made while a child runs


class Supervisor:
    """Runs until stopped (or, in burst mode, until the queues are empty). :meth:`run` returns the exit code."""

    def __init__(self, cfg: Config, broker: Broker, log, burst: bool = False):
        self.cfg, self.broker, self.burst = cfg, broker, burst
        self.name = cfg.worker_name()
        self.log = log
        self.sig = SignalState(hard_exit_after=cfg.hard_exit_after)
        self.proc = Processor(cfg, self.sig, log, tick=self._tick, on_stop=self._stopping_while_busy)
        self._next_beat = 0.0
        self._side: Optional[Broker] = None
        self._resync = False
        self.fatal: Optional[str] = None
        self._next_recover = 0.0
        self._outage = 0
        self.processed = 0

    # --- main loop ---
    def run(self) -> int:
        self.sig.install()
        cfg = self.cfg
        self.log.info("worker.start", redis=redact_url(cfg.redis_url), queues=",".join(cfg.queues),
                      pid=os.getpid(), window=cfg.shutdown_window, term_timeout=cfg.term_timeout,
                      grace=cfg.term_grace, burst=self.burst or None)
        try:  # before claiming anything: job modules import here, and a slow import must not hold a claimed job
            self.proc.forks.start()
        except ForkServerError as exc:
            self.fatal = f"cannot start jobs: {exc}"
            self.log.error("worker.fatal", error=self.fatal)
        pending: Optional[Outcome] = None
        registered = False
        adopted: list = []  # claims whose reply was lost, found in our own processing list: run them
        while not (self.sig.stopping or self.sig.quit or self.fatal):
            try:
                if not registered:
                    self._register()
                    registered = True
                    self._recover()
                if self._resync:
                    keep = pending.payload if pending is not None else None
                    adopted = [p for p in self.broker.claimed(self.name) if p != keep]
                    self._resync = False
                if adopted and pending is not None:
                    self._note(self.broker.cycle(self.name, pending, claim=False))
                    pending = None
                if self.sig.paused and not adopted:  # claims we already hold run first: they are ours
                    self._note(self.broker.cycle(self.name, pending, claim=False))  # also the heartbeat
                    pending = None
                    self.broker.set_state(self.name, "paused")
                    if time.monotonic() >= self._next_recover:
                        self._recover()
                    self._wait(IDLE_POLL)
                    continue
                if adopted:
                    raw = adopted.pop(0)
                    c = Cycle(raw, jobs.queue_of(raw, "default" if cfg.all_queues else cfg.queues[0]), None, [], 1)
                    self.log.warning("job.adopted", job=jobs.loose_id(raw), queue=c.queue,
                                     reason="claimed by a call whose reply was lost")
                else:
                    c = self._note(self.broker.cycle(self.name, pending, claim=True))
                    pending = None
                self._outage_over()
            except redis.RedisError as exc:
                self._resync = True  # the failed call may have run: check our processing list when Redis is back
                self._redis_down(exc)
                continue
            now = time.monotonic()
            self._next_beat = now + self.cfg.heartbeat_interval  # the cycle just beat
            if now >= self._next_recover:
                self._recover()
            if c.payload is None:
                if self.burst:
                    break
                self._idle(c.queues, c.next_due)
                continue
            if self.sig.stopping or self.sig.quit:  # claimed while a stop arrived: hand it straight back
                pending = Outcome.requeue(c.payload, c.queue)
                break
            try:
                pending = self._process(c.payload, c.queue)
            except Exception as exc:  # a runtime bug must cost one job (recorded), never the worker
                job_id = jobs.loose_id(c.payload)
                self.log.error("job.runtime_error", job=job_id, error=f"{type(exc).__name__}: {exc}")
                pending = Outcome.fail(c.payload, job_id, failed_record(
                    c.payload, job_id, "", c.queue, self.name, 1, "runtime_error",
                    {"type": type(exc).__name__, "message": str(exc)[:2000]}, []))
        return self._exit(pending, registered)

    def _register(self) -> None:
        if self.broker.name_in_use(self.name):  # a previous incarnation with our $DYNO and pid: never share its keys
            self.name = f"{self.name}:{os.urandom(3).hex()}"
            self.log.bound["worker"] = self.name
        cfg = self.cfg
        self.broker.register(self.name, {
            "host": socket.gethostname(), "pid": os.getpid(), "dyno": cfg.dyno or "",
            "queues": ",".join(cfg.queues), "started": time.time(), "state": "idle"})

    def _note(self, c: Cycle) -> Cycle:
        """A processing list holding more than the job just claimed means a lost reply left a claim behind."""
        if c.held > (1 if c.payload is not None else 0):
            self._resync = True
        return c

    def _process(self, raw: str, queue: str) -> Outcome:
        try:
            spec, doc = jobs.decode(raw, self.cfg.max_payload)
        except jobs.BadJob as exc:
            job_id = jobs.loose_id(raw)
            self.log.warning("job.bad", job=job_id, queue=queue, reason=str(exc))
            return Outcome.fail(raw, job_id, failed_record(raw, job_id, "", queue, self.name, 1, "bad_payload",
                                                     {"type": "BadJob", "message": str(exc)}, []))
        self.log.debug("job.start", job=doc["id"], name=spec.name, queue=queue)
        try:
            res = self.proc.run(spec, doc, raw)
        except ForkServerError as exc:  # the job never started: put it back, and stop (a worker that cannot
            self.fatal = f"cannot start jobs: {exc}"  # fork is broken; the platform restarts crashed dynos)
            self.log.error("worker.fatal", error=self.fatal, job=doc["id"])
            return Outcome.requeue(raw, queue)
        status = res["status"]
        fields = dict(job=doc["id"], name=spec.name, queue=queue, duration=res["duration"])
        if status == "ok":
            self.processed += 1
            self.log.info("job.done", outcome="done", **fields)
            return Outcome.ack(raw)
        if status == "interrupted":
            self.log.info("shutdown.job_put_back", outcome="requeued", elapsed=self._elapsed(), **fields)
            return Outcome.requeue(raw, queue)
        attempts = int(doc.get("attempts") or 0) + 1
        retries = spec.retries if spec.retries is not None else self.cfg.job_retries
        history = list(doc.get("errors") or [])[-9:] + [{
            "at": time.time(), "worker": self.name, "cause": status,
            "type": res.get("type"), "message": res.get("message")}]
        if attempts <= retries:
            delay = backoff_delay(attempts)
            new_doc = dict(doc, attempts=attempts, errors=history, enqueued_at=round(time.time() + delay, 6))
            self.log.warning("job.retry", outcome=status, attempt=attempts, delay=delay,
                             error=res.get("message"), **fields)
            return Outcome.retry(raw, jobs.json_dumps(new_doc), delay)
        self.log.warning("job.failed", outcome=status, attempts=attempts, error=res.get("message"), **fields)
        return Outcome.fail(raw, doc["id"], failed_record(raw, doc["id"], spec.name, queue, self.name, attempts, status,
                                                    res, history))

    # --- waiting ---
    def _idle(self, known, next_due) -> None:
        queues = known if self.cfg.all_queues else self.cfg.queues
        timeout = IDLE_POLL
        if next_due is not None:
            timeout = min(timeout, max(0.01, next_due / 1000.0 - time.time()))
        if not queues:
            self._wait(timeout)
            return
        # A byte left in the wake-up pipe (e.g. the last child's SIGCHLD) would end the BLPOP at once and cost a
        # reconnect; drain it first. A signal arriving after the drain still wakes the wait, as it should.
        self.sig.drain()
        if self.sig.stopping or self.sig.quit or self.sig.paused:
            return
        try:
            client.blocking_pop(self.broker.r, self.broker.wake_keys(queues), round(timeout, 3), self.sig.wake_r)
        except redis.RedisError as exc:
            self._redis_down(exc)
        self.sig.drain()

    def _wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``; any signal ends the wait early."""
        try:
            select.select([self.sig.wake_r], [], [], max(0.0, seconds))
        except InterruptedError:
            pass
        self.sig.drain()

    def _redis_down(self, exc) -> None:
        self._outage += 1
        delay = client.outage_backoff().compute(self._outage)
        if self._outage == 1 or self._outage % 10 == 0:
            self.log.error("redis.unavailable", error=f"{type(exc).__name__}: {exc}", retry_in=delay,
                           attempt=self._outage)
        self._wait(delay)

    def _outage_over(self) -> None:
        if self._outage:
            self.log.info("redis.reconnected", after_attempts=self._outage)
            self._outage = 0

    # --- calls from the processor while a job runs ---
    def _side_broker(self) -> Broker:
        if self._side is None:
            self._side = Broker(client.connect(self.cfg, timeout=SIDE_TIMEOUT, retries=0, name="worker-side"),
                                self.cfg)
        return self._side

    def _stopping_while_busy(self) -> None:
        """The job has been told to stop: log it and show ``stopping`` in status (bounded, best effort)."""
        self.sig.announce(self.log)
        try:
            self._side_broker().set_state(self.name, "stopping")
        except redis.RedisError:
            pass

    def _tick(self) -> None:
        """Heartbeat and recovery while busy, on a side connection whose calls give up after SIDE_TIMEOUT with no
        retries: the processor must stay responsive to signals and deadlines even if Redis hangs. The side
        connection is opened only once a job outlives one heartbeat interval (at most 2 connections per worker)."""
        now = time.monotonic()
        if now < self._next_beat:  # beats go on while stopping: a job in cleanup must not look orphaned
            return
        self._next_beat = now + self.cfg.heartbeat_interval
        try:
            self._side_broker().heartbeat(self.name)
        except redis.RedisError:
            pass  # the loop reports outages; a missed beat is harmless well within HEARTBEAT_TTL
        if now >= self._next_recover:
            self._recover(self._side)

    def _recover(self, broker=None) -> None:
        self._next_recover = time.monotonic() + 2 * self.cfg.heartbeat_interval
        try:
            for item in (broker or self.broker).recover(skip=self.name):
                what, _, job_id = item.partition(":")
                self.log.warning("recovery." + what, job=job_id, reason="owner's heartbeat expired")
        except redis.RedisError:
            pass

    # --- shutdown ---
    def _elapsed(self):
        return round(time.monotonic() - self.sig.stop_at, 3) if self.sig.stop_at is not None else None

    def _exit(self, pending: Optional[Outcome], registered: bool) -> int:
        sig = self.sig
        sig.announce(self.log)
        broker = self.broker
        if sig.stopping:
            # Last bookkeeping on a fresh connection whose every call is bounded by the time left, so a hung Redis
            # cannot keep us past the window. What cannot be written stays in the processing list: recovered later.
            left = sig.stop_at + self.cfg.hard_exit_after - 0.1 - time.monotonic()
            broker.r.close()
            broker = Broker(client.connect(self.cfg, timeout=max(0.05, left / 2), retries=0, name="worker-exit"),
                            self.cfg)
        try:
            if pending is not None:
                broker.cycle(self.name, pending, claim=False)
            if registered:
                broker.unregister(self.name)
        except redis.RedisError as exc:
            self.log.error("shutdown.bookkeeping_failed", error=f"{type(exc).__name__}: {exc}",
                           note="unacknowledged job stays in the processing list and will be recovered")
        finally:
            broker.r.close()
            if self._side is not None:
                self._side.r.close()
            self.proc.close()
        # Our handlers stayed in place through the bookkeeping above (a TERM there arms the watchdog, whatever made
        # us exit); from here a late TERM (Heroku may repeat it) must not kill the interpreter's own shutdown.
        sig.ignore_stops()
        reason = "signal" if sig.stopping else "quit" if sig.quit else "fatal" if self.fatal else "burst"
        self.log.info("worker.exit", processed=self.processed, elapsed=self._elapsed(), reason=reason)
        return 1 if self.fatal and not sig.stopping else 0
