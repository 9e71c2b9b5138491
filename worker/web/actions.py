"""The dashboard's state changes. Each is one atomic Redis call (a script or a MULTI), so a job is never both in
two places nor in none: run-now moves a scheduled payload to its queue in one script; delete removes exactly the
payload shown (LREM/ZREM of that exact text, so a job that moved meanwhile is left alone)."""
from __future__ import annotations

from ..failed import FailedRegistry
from ..keys import Keys
from ..lua import PRELUDE, WAKE

# KEYS: scheduled zset, queues set.  ARGV: prefix, payloads...  Moves each still-scheduled payload to the tail of its
# queue (the queue named in the payload; payloads without one stay where they are). Returns how many moved.
RUN_NOW = PRELUDE + r"""
local moved = 0
for i = 2, #ARGV do
  local raw = ARGV[i]
  local ok, doc = pcall(cjson.decode, raw)
  local q = ok and type(doc) == 'table' and doc['queue']
  if type(q) == 'string' and q ~= '' and redis.call('ZSCORE', KEYS[1], raw) then
    redis.call('ZREM', KEYS[1], raw)
    redis.call('RPUSH', prefix .. ':queue:' .. q, raw)
    redis.call('SADD', KEYS[2], q)
    wake(q)
    moved = moved + 1
  end
end
return moved
"""


class _BrokerView:
    """What FailedRegistry needs of a broker: a client and the key builder."""

    def __init__(self, r, keys):
        self.r, self.keys = r, keys


class Actions:
    def __init__(self, r, cfg):
        self.r, self.cfg = r, cfg
        self.k = Keys(cfg.key_prefix)
        self._run_now = r.register_script(RUN_NOW)

    def pause(self, queue: str) -> bool:
        return bool(self.r.sadd(self.k.paused, queue))

    def resume(self, queue: str) -> bool:
        changed = self.r.srem(self.k.paused, queue)
        self.r.eval(WAKE, 1, self.k.wake(queue))  # idle workers blocked on it claim at once
        return bool(changed)

    def delete_queued(self, queue: str, payload: str) -> int:
        return self.r.lrem(self.k.queue(queue), 1, payload)

    def retry_failed(self, ids) -> int:
        return len(FailedRegistry(_BrokerView(self.r, self.k)).retry(ids))

    def delete_failed(self, ids) -> int:
        return FailedRegistry(_BrokerView(self.r, self.k)).remove(ids)

    def run_scheduled(self, payloads) -> int:
        payloads = list(payloads)
        return int(self._run_now(keys=[self.k.scheduled, self.k.queues], args=[self.k.prefix, *payloads])) \
            if payloads else 0

    def delete_scheduled(self, payloads) -> int:
        payloads = list(payloads)
        return self.r.zrem(self.k.scheduled, *payloads) if payloads else 0
