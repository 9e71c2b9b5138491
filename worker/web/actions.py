"""The dashboard's state changes. Each is one atomic Redis call (a script or a MULTI), so a job is never both in
two places nor in none: run-now moves a scheduled payload to its queue in one script; delete removes exactly the
payload shown (LREM/ZREM of that exact text, so a job that moved meanwhile is left alone)."""
from __future__ import annotations

from ..failed import FailedRegistry
from ..keys import Keys
from ..lua import Registry, calls



class _BrokerView:
    """What FailedRegistry needs of a broker: a client and the key builder."""

    def __init__(self, r, keys):
        self.r, self.keys = r, keys


class Actions:
    def __init__(self, r, cfg):
        self.r, self.cfg = r, cfg
        self.k = Keys(cfg.key_prefix)
        self.scripts = Registry(r)

    def pause(self, queue: str) -> bool:
        return bool(self.r.sadd(self.k.paused, queue))

    def resume(self, queue: str) -> bool:
        changed = self.r.srem(self.k.paused, queue)
        self.scripts.run(calls.wake(self.k, [queue]))  # idle workers blocked on it claim at once
        return bool(changed)

    def delete_queued(self, queue: str, payload: str) -> int:
        return self.r.lrem(self.k.queue(queue), 1, payload)

    def retry_failed(self, ids) -> int:
        return len(FailedRegistry(_BrokerView(self.r, self.k)).retry(ids))

    def delete_failed(self, ids) -> int:
        return FailedRegistry(_BrokerView(self.r, self.k)).remove(ids)

    def run_scheduled(self, payloads) -> int:
        payloads = list(payloads)
        return int(self.scripts.run(calls.run_now(self.k, payloads))) if payloads else 0

    def cancel(self, job_id: str) -> tuple:
        """``(canceled, reason)``: ``worker.control.cancel_job`` (one script, atomic with the claim)."""
        from ..control import cancel_job
        return cancel_job(self, job_id)

    @property
    def keys(self):  # (what cancel_job reads of a broker: scripts, keys, cfg)
        return self.k

    def delete_scheduled(self, payloads) -> int:
        payloads = list(payloads)
        return self.r.zrem(self.k.scheduled, *payloads) if payloads else 0
