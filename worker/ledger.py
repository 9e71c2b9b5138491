"""The supervisor's jobs between Redis and the slots: where a claim becomes a job (:meth:`Ledger.start`, the one
place a ``claimed.ClaimedJob`` is made), where a finished run becomes an outcome (:meth:`Ledger.finished`, through
``policy.decide``), and the outcomes not yet recorded (``pending``), which the next CYCLE call records."""
from __future__ import annotations

import time

import redis

from . import jobs
from .claimed import ClaimedJob
from .fetch import Outcome
from .forkserver import ForkServerError
from .policy import Decision, bad, decide, unknown


class Ledger:
    def __init__(self, cfg, log, slots, sig, member):
        self.cfg, self.log, self.slots, self.sig, self.member = cfg, log, slots, sig, member
        self.pending: list = []        # outcomes not yet recorded
        self.cleared: list = []        # slots whose saved checkpoint goes with their finished job
        self.processed = 0

    def start(self, index: int, raw: str, queue: str, claimed_ms: int = 0) -> None:
        """Where a claim becomes a job: run it in slot ``index``, or record why it cannot run."""
        name = self.member.name
        try:
            doc = jobs.parse(raw, self.cfg.max_payload)
        except jobs.BadJob as exc:
            self.note(bad(raw, jobs.loose_id(raw), queue, name, str(exc), index))
            return
        declared = self.slots.meta.get(doc["name"])
        if declared is None:  # a rolling deploy: put back for UNKNOWN_JOB_GRACE, then failed (policy.unknown)
            self.note(unknown(raw, doc, queue, index, name, self.cfg.unknown_job_grace))
            return
        if not self.slots.ready:  # the fork server was just replaced (a failed hand-over in this same turn)
            self.pending.append(Outcome.requeue(raw, queue, index))
            return
        job = ClaimedJob.of(raw, doc, queue, index, claimed_ms, declared, self.cfg)
        self.log.debug("job.start", job=job.id, name=job.name, queue=queue, slot=index)
        try:
            self.slots.start(job)
        except ForkServerError:
            pass  # collect() writes it off as unstarted: put back

    def finished(self, slot) -> None:
        """Record what a finished slot's run means (``policy.decide``), and free the slot."""
        if slot.saved is not None:
            self.cleared.append(slot.index)
        job = slot.job
        if slot.lost:
            pass  # another worker has the job now (see Membership.claims_lost): nothing to record
        elif slot.unstarted:  # never reached a child: it goes back as it was
            self.pending.append(Outcome.requeue(job.raw, job.queue, slot.index))
        else:
            try:
                d = decide(slot.result(self.cfg.job_max_memory_mb), job, self.member.name, slot.out.checkpoint,
                           self.elapsed())
            except Exception as exc:  # a runtime bug (or data no check foresaw) costs this job, never the worker
                job_id = jobs.loose_id(job.raw)
                self.log.error("job.runtime_error", job=job_id, error=f"{type(exc).__name__}: {exc}")
                d = bad(job.raw, job_id, job.queue, self.member.name, f"worker could not record the outcome: "
                        f"{type(exc).__name__}: {exc}", slot.index, started_ms=job.claimed_ms)
            if d.event == "job.done":
                self.processed += 1
            self.note(d)
        slot.clear()

    def note(self, d: Decision) -> None:
        for level, event, fields in d.notes:
            getattr(self.log, level)(event, **fields)
        getattr(self.log, d.level)(d.event, **d.fields)
        self.pending.append(d.outcome)

    def give_back(self, fallback_queue: str) -> None:
        """Claims found in our processing list (a lost reply) and never started go back to their queues."""
        self.pending += [Outcome.requeue(raw, jobs.queue_of(raw, fallback_queue), -1)  # no slot
                         for raw in self.member.adopted]
        self.member.adopted = []

    def elapsed(self):
        """Seconds since the stop signal, or None."""
        return round(time.monotonic() - self.sig.stop_at, 3) if self.sig.stop_at is not None else None

    def record_last(self, broker, mode: str) -> None:
        """The last bookkeeping's call: record what is left on ``broker`` (the exit's own connection)."""
        m = self.member
        c = broker.cycle(m.name, self.pending, (), 0, mode)
        if c.lost:  # Redis lost our claims: put them back
            m.restore(self.pending, broker)
            c = broker.cycle(m.name, self.pending, (), 0, mode)
        while c.refused:  # what needs a wrong-typed key stays claimed (recovered later); the rest lands
            rest = m.refused(*c.refused, self.pending)
            if not rest:
                break
            self.pending = rest
            c = broker.cycle(m.name, rest, (), 0, mode)
        for key in c.odd:  # skipped wrong-typed bookkeeping keys are named here too, as in every turn's call
            try:
                kind = broker.r.type(key)  # the exit's connection: bounded by what is left of the window
            except redis.RedisError:
                kind = "?"
            m.wrong_type(key, kind)
