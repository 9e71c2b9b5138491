"""One claimed job, resolved once (Sidekiq's ``UnitOfWork``, dramatiq's ``MessageProxy``).

A claim becomes a job in one place, :meth:`worker.ledger.Ledger.start`, which parses the payload and calls
:meth:`ClaimedJob.of`. From there the job travels whole and frozen: to its slot (``slot.Slot.job``) and to
``policy.decide``, which needs nothing else of it. Every per-job option is resolved here (``jobs.JobOptions``):
nothing downstream defaults one.
"""
from __future__ import annotations

from dataclasses import dataclass

from .jobspec import JobOptions


@dataclass(frozen=True, eq=False)
class ClaimedJob:
    raw: str               # the payload exactly as claimed: what the processing list holds, and what the outcome names
    doc: dict              # raw, parsed (payload.parse): id, name, args, kwargs, and the runtime's fields
    queue: str             # the queue it was claimed from (where it goes back), whatever its payload says
    slot: int              # the slot it was claimed for
    claimed_ms: int        # when Redis handed it over (ms, Redis's clock): its started_at; 0 = unknown (adopted)
    options: JobOptions    # every per-job option, resolved

    @classmethod
    def of(cls, raw: str, doc: dict, queue: str, slot: int, claimed_ms: int, declared: dict, cfg) -> "ClaimedJob":
        """``declared``: the job's entry of ``jobs.meta()`` (what its ``@job`` gave); ``cfg``: the worker's Config;
        the payload's own "options" (``f.options(...)``) win over both."""
        return cls(raw, doc, queue, slot, claimed_ms, JobOptions.resolve(declared, cfg, doc.get("options")))

    @property
    def id(self) -> str:
        return self.doc["id"]

    @property
    def name(self) -> str:
        return self.doc["name"]
