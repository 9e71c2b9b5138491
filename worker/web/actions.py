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


class GroupActions:
    """:class:`Actions` over queue groups (QUEUE_GROUPS): a queue's actions go to its group's key space; failed and
    scheduled jobs (shown with their payload or id) are acted on where they are; cancel where the id is known."""

    def __init__(self, r, cfg):
        from ..client import for_space
        self.cfg = cfg
        self.parts = [Actions(for_space(r, s.key_prefix), s) for s in cfg.spaces()]

    def _of(self, queue: str) -> Actions:
        from ..api_groups import part_of
        return part_of(self.parts, self.cfg, queue)

    def pause(self, queue: str) -> bool:
        return self._of(queue).pause(queue)

    def resume(self, queue: str) -> bool:
        return self._of(queue).resume(queue)

    def delete_queued(self, queue: str, payload: str) -> int:
        return self._of(queue).delete_queued(queue, payload)

    def retry_failed(self, ids) -> int:
        ids = list(ids)
        return sum(a.retry_failed(ids) for a in self.parts)

    def delete_failed(self, ids) -> int:
        ids = list(ids)
        return sum(a.delete_failed(ids) for a in self.parts)

    def run_scheduled(self, payloads) -> int:
        payloads = list(payloads)
        return sum(a.run_scheduled(payloads) for a in self.parts)

    def delete_scheduled(self, payloads) -> int:
        payloads = list(payloads)
        return sum(a.delete_scheduled(payloads) for a in self.parts)

    def cancel(self, job_id: str) -> tuple:
        res = (False, "unknown")
        for a in self.parts:
            res = a.cancel(job_id)
            if res[0] or res[1] != "unknown":
                break
        return res


def actions(r, cfg):
    """The dashboard's actions for ``cfg``: :class:`Actions`, or :class:`GroupActions` with QUEUE_GROUPS."""
    return GroupActions(r, cfg) if cfg.queue_groups else Actions(r, cfg)

