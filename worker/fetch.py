"""Claim and acknowledge: the fetch contract, in a few atomic Lua scripts (key schema: ``keys.py``).

Invariants (at-least-once delivery; losing a job is worse than running it twice):

* A claimed job is moved from its queue into this worker's processing list by ``LMOVE`` inside the same script
  that chose it, so there is never a moment where it exists only in a process's memory.
* It leaves the processing list only inside the script that records its outcome (done, failed, retry scheduled,
  or put back at the head of its queue).
* The outcome of job N and the claim of job N+1 travel in one script call (:meth:`Broker.cycle`): one round trip
  per job on the hot path, which also refreshes the heartbeat and moves due scheduled jobs.
* A worker whose heartbeat is older than ``HEARTBEAT_TTL`` is dead; :meth:`Broker.recover` moves its processing
  list back to the head of the queues in one script, so several workers recovering at once cannot double it.
"""
from __future__ import annotations

import json
import random
import time
from typing import Iterable, NamedTuple, Optional

from . import jobs
from .config import Config
from .keys import Keys

# Shared Lua helpers; every script starts with these.
_PRELUDE = r"""
local prefix = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function wake(q)
  local k = prefix .. ':wake:' .. q
  if redis.call('LLEN', k) == 0 then redis.call('RPUSH', k, '1') end
end
-- Set bookkeeping fields without re-encoding the payload: cjson cannot tell [] from {} and would change the
-- job's own arguments, so the fields are appended as duplicate keys, which JSON decoders (Python's, cjson) resolve
-- to the last occurrence. Payloads are objects with at least an id, so the body before the final brace is never
-- empty. Growth is bounded: only recovery (at most MAX_ATTEMPTS times) and failed-retry append.
local function with_fields(p, fragment)
  local body = string.match(p, '^(.*)}%s*$')
  if not body then return p end
  return body .. ',' .. fragment .. '}'
end
local function record_failure(id, record, max_n, ttl_ms)
  local fz, fd = prefix .. ':failed', prefix .. ':failed:data'
  redis.call('ZADD', fz, now, id)
  redis.call('HSET', fd, id, record)
  redis.call('INCR', prefix .. ':stat:failed')
  local old = redis.call('ZRANGEBYSCORE', fz, '-inf', now - ttl_ms, 'LIMIT', 0, 500)
  for _, v in ipairs(old) do redis.call('HDEL', fd, v); redis.call('ZREM', fz, v) end
  local n = redis.call('ZCARD', fz)
  if n > max_n then
    local extra = redis.call('ZRANGE', fz, 0, n - max_n - 1)
    for _, v in ipairs(extra) do redis.call('HDEL', fd, v) end
    redis.call('ZREMRANGEBYRANK', fz, 0, n - max_n - 1)
  end
end
"""

# KEYS: queue, queues-set.  ARGV: prefix, queue name, payload...
_ENQUEUE = _PRELUDE + r"""
redis.call('RPUSH', KEYS[1], unpack(ARGV, 3))
redis.call('SADD', KEYS[2], ARGV[2])
wake(ARGV[2])
return 1
"""

# KEYS: processing, workers, worker-hash, scheduled, paused, queues-set
# ARGV: prefix, worker, op, payload, job id, extra, extra2, claim, failed_max, failed_ttl_ms, wildcard, queues...
_CYCLE = _PRELUDE + r"""
local processing, worker = KEYS[1], ARGV[2]
local op, payload = ARGV[3], ARGV[4]
redis.call('ZADD', KEYS[2], now, worker)
-- The outcome takes effect only if the job was still ours: a call repeated after a timeout (redis-py retries, or
-- the supervisor's own retry after an outage) or a job already recovered by another worker records nothing twice.
if op ~= '' and redis.call('LREM', processing, -1, payload) == 1 then
  if op == 'ack' then
    redis.call('INCR', prefix .. ':stat:processed')
  elseif op == 'fail' then
    record_failure(ARGV[5], ARGV[6], tonumber(ARGV[9]), tonumber(ARGV[10]))
  elseif op == 'retry' then
    redis.call('ZADD', KEYS[4], now + tonumber(ARGV[7]), ARGV[6])
  elseif op == 'requeue' then
    redis.call('LPUSH', prefix .. ':queue:' .. ARGV[7], payload)
    wake(ARGV[7])
  end
end
-- due scheduled jobs (retries, enqueue_in/at) move to their queues; ZREM makes each move happen once
local due = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, 100)
for _, p in ipairs(due) do
  local ok, doc = pcall(cjson.decode, p)
  local q = (ok and type(doc) == 'table' and type(doc['queue']) == 'string') and doc['queue'] or 'default'
  -- push first, and only then remove from the schedule: a queue key of the wrong type leaves the job scheduled
  -- (visible in status) instead of raising half-way through this script and losing it
  local pushed = redis.pcall('RPUSH', prefix .. ':queue:' .. q, p)
  if type(pushed) == 'number' then
    redis.call('ZREM', KEYS[4], p)
    redis.call('SADD', KEYS[6], q)
    wake(q)
  end
end
local queues = {}
if ARGV[11] == '1' then
  queues = redis.call('SORT', KEYS[6], 'ALPHA')
else
  for i = 12, #ARGV do queues[#queues + 1] = ARGV[i] end
end
local wh = KEYS[3]
if ARGV[8] == '1' then
  local all_paused = redis.call('SISMEMBER', KEYS[5], '*') == 1
  local open = 0
  for _, q in ipairs(queues) do
    if not all_paused and redis.call('SISMEMBER', KEYS[5], q) == 0 then
      open = open + 1
      local qk = prefix .. ':queue:' .. q
      local v = redis.call('LMOVE', qk, processing, 'LEFT', 'RIGHT')
      if v then
        if redis.call('LLEN', qk) > 0 then wake(q) end
        redis.call('HSET', wh, 'state', 'busy', 'job', v, 'job_started', now, 'seen', now)
        return {v, q, '', redis.call('LLEN', processing)}
      end
    end
  end
  redis.call('HSET', wh, 'state', (open == 0 and #queues > 0) and 'paused' or 'idle', 'job', '', 'seen', now)
else
  redis.call('HSET', wh, 'job', '', 'seen', now)
end
local nxt = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
local res = {'', '', nxt[2] or '', redis.call('LLEN', processing)}
for _, q in ipairs(queues) do res[#res + 1] = q end
return res
"""

# KEYS: workers.  ARGV: prefix, ttl_ms, max_attempts, failed_max, failed_ttl_ms, skip (our own name)
_RECOVER = _PRELUDE + r"""
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]), 'LIMIT', 0, 100)
local out = {}
for _, w in ipairs(dead) do
  if w ~= ARGV[6] then
    local pk = prefix .. ':processing:' .. w
    local items = redis.call('LRANGE', pk, 0, -1)
    for i = #items, 1, -1 do
      local p = items[i]
      local ok, doc = pcall(cjson.decode, p)
      if ok and type(doc) == 'table' and type(doc['id']) == 'string' then
        if type(doc['queue']) ~= 'string' or doc['queue'] == '' then doc['queue'] = 'default' end
        doc['attempts'] = (tonumber(doc['attempts']) or 0) + 1
        local hist = doc['errors']
        if type(hist) ~= 'table' then hist = {} end
        hist[#hist + 1] = {at = now / 1000, worker = w, cause = 'lost',
                           message = 'worker vanished (heartbeat expired) while running the job'}
        while #hist > 10 do table.remove(hist, 1) end
        -- a script that errors half-way keeps its earlier writes, so nothing below may raise: history that cannot
        -- be encoded (NaN from a foreign producer) is replaced rather than allowed to abort the recovery
        local hok, hjson = pcall(cjson.encode, hist)
        if not hok then
          hist = {{at = now / 1000, worker = w, cause = 'lost', message = 'worker vanished; history unreadable'}}
          hjson = cjson.encode(hist)
        end
        local pushed = false
        if doc['attempts'] < tonumber(ARGV[3]) then
          pushed = type(redis.pcall('LPUSH', prefix .. ':queue:' .. doc['queue'],
                   with_fields(p, '"attempts":' .. doc['attempts'] .. ',"errors":' .. hjson))) == 'number'
        end
        if pushed then
          wake(doc['queue'])
          out[#out + 1] = 'requeued:' .. doc['id']
        else  -- out of attempts (or its queue key is unusable): the failed registry keeps it
          local rec = cjson.encode({id = doc['id'], name = tostring(doc['name']), queue = doc['queue'], payload = p,
            cause = 'lost', type = 'WorkerLost', worker = w, attempts = doc['attempts'], failed_at = now / 1000,
            message = 'worker vanished ' .. doc['attempts'] .. ' times while running the job (MAX_ATTEMPTS)',
            traceback = '', history = hist})  -- every field here is a string, number or the checked history
          record_failure(doc['id'], rec, tonumber(ARGV[4]), tonumber(ARGV[5]))
          out[#out + 1] = 'failed:' .. doc['id']
        end
      else
        local id = redis.sha1hex(p)
        local rec = cjson.encode({id = id, name = '', queue = '', payload = p, cause = 'bad_payload',
          type = 'BadJob', worker = w, attempts = 1, failed_at = now / 1000, traceback = '', history = {},
          message = 'unreadable payload left by a vanished worker'})
        record_failure(id, rec, tonumber(ARGV[4]), tonumber(ARGV[5]))
        out[#out + 1] = 'failed:' .. id
      end
    end
    redis.call('DEL', pk, prefix .. ':worker:' .. w)
    redis.call('ZREM', KEYS[1], w)
  end
end
return out
"""

# KEYS: workers, processing, worker-hash.  ARGV: prefix, worker.  Leaves the worker registered (so recovery finds
# it after the TTL) if its processing list is not empty: an unacknowledged job is never dropped by exiting.
_UNREGISTER = _PRELUDE + r"""
if redis.call('LLEN', KEYS[2]) > 0 then
  redis.call('HSET', KEYS[3], 'state', 'exited')
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[3])
return 1
"""

# KEYS: workers.  ARGV: worker.  Heartbeats use the Redis clock, shared by every dyno.
_HEARTBEAT = "local t = redis.call('TIME') redis.call('ZADD', KEYS[1], t[1] * 1000 + math.floor(t[2] / 1000), ARGV[1])"


class Cycle(NamedTuple):
    """What :meth:`Broker.cycle` found: the claimed payload and its queue (or None), the next scheduled due time
    (ms, when nothing was claimed), the queue names considered, and how many jobs the processing list holds."""

    payload: Optional[str]
    queue: Optional[str]
    next_due: Optional[float]
    queues: list
    held: int


class Outcome:
    """How a claimed job ended, to be recorded by the next :meth:`Broker.cycle` (the unit of work's ack/requeue)."""

    __slots__ = ("op", "payload", "job_id", "extra", "extra2")

    def __init__(self, op: str, payload: str, job_id: str = "", extra: str = "", extra2: str = ""):
        self.op, self.payload, self.job_id, self.extra, self.extra2 = op, payload, job_id, extra, extra2

    @classmethod
    def ack(cls, payload):
        return cls("ack", payload)

    @classmethod
    def requeue(cls, payload, queue):
        """Put back at the head of ``queue`` (graceful interruption: does not count as an attempt)."""
        return cls("requeue", payload, extra2=queue)

    @classmethod
    def fail(cls, payload, job_id, record: dict):
        return cls("fail", payload, job_id, json.dumps(record, separators=(",", ":"), default=str))

    @classmethod
    def retry(cls, payload, new_payload: str, delay: float):
        return cls("retry", payload, extra=new_payload, extra2=str(int(delay * 1000)))


def backoff_delay(attempt: int, base: float = 2.0, cap: float = 3600.0) -> float:
    """Exponential backoff with full jitter for retry number ``attempt`` (1-based)."""
    return random.uniform(0.5, 1.0) * min(cap, base * (2 ** max(0, attempt - 1)))


class Broker:
    """All Redis operations of the runtime on one client (one connection in a single-threaded process)."""

    def __init__(self, redis_client, cfg: Config):
        self.r = redis_client
        self.cfg = cfg
        self.keys = Keys(cfg.key_prefix)
        self._enqueue = redis_client.register_script(_ENQUEUE)
        self._cycle = redis_client.register_script(_CYCLE)
        self._recover = redis_client.register_script(_RECOVER)
        self._unregister = redis_client.register_script(_UNREGISTER)

    # --- producers ---
    def push(self, name: str, args, kwargs, queue: Optional[str] = None, due: Optional[float] = None) -> str:
        job_id, q, payload = jobs.build_payload(name, args, kwargs, queue, self.cfg.max_payload, at=due)
        if due is not None and due > time.time():
            self.r.zadd(self.keys.scheduled, {payload: int(due * 1000)})
        else:
            self._enqueue(keys=[self.keys.queue(q), self.keys.queues], args=[self.keys.prefix, q, payload])
        return job_id

    def push_many(self, name: str, calls: Iterable, queue: Optional[str] = None, batch: int = 1000) -> list:
        ids, by_queue = [], {}
        for call in calls:
            if isinstance(call, tuple) and len(call) == 2 and isinstance(call[1], dict):
                args, kwargs = call
            else:
                args, kwargs = call, {}
            job_id, q, payload = jobs.build_payload(name, args, kwargs, queue, self.cfg.max_payload)
            ids.append(job_id)
            by_queue.setdefault(q, []).append(payload)
        with self.r.pipeline(transaction=False) as pipe:
            for q, payloads in by_queue.items():
                for i in range(0, len(payloads), batch):
                    self._enqueue(keys=[self.keys.queue(q), self.keys.queues],
                                  args=[self.keys.prefix, q, *payloads[i:i + batch]], client=pipe)
            pipe.execute()
        return ids

    # --- the worker's side ---
    def register(self, worker: str, info: dict) -> None:
        with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.worker(worker))
            pipe.hset(self.keys.worker(worker), mapping=info)
            pipe.eval(_HEARTBEAT, 1, self.keys.workers, worker)
            pipe.execute()

    def cycle(self, worker: str, outcome: Optional[Outcome], claim: bool) -> "Cycle":
        """Record ``outcome`` (if any), refresh the heartbeat, move due scheduled jobs and, if ``claim``, claim the
        next job, in one round trip. ``Cycle.held`` counts what the processing list holds afterwards: more than
        the claimed job means an earlier call's reply was lost after it claimed (see :meth:`claimed`)."""
        o = outcome or Outcome("", "")
        k = self.keys
        res = self._cycle(
            keys=[k.processing(worker), k.workers, k.worker(worker), k.scheduled, k.paused, k.queues],
            args=[k.prefix, worker, o.op, o.payload, o.job_id, o.extra, o.extra2, "1" if claim else "0",
                  self.cfg.failed_max, int(self.cfg.failed_ttl * 1000), "1" if self.cfg.all_queues else "0",
                  *([] if self.cfg.all_queues else self.cfg.queues)])
        if res[1]:  # the queue name: a claimed payload may itself be an empty string
            return Cycle(res[0], res[1], None, [], int(res[3]))
        return Cycle(None, None, float(res[2]) if res[2] else None, list(res[4:]), int(res[3]))

    def claimed(self, worker: str) -> list:
        """What this worker's processing list holds (used to re-adopt claims whose reply was lost)."""
        return self.r.lrange(self.keys.processing(worker), 0, -1)

    def name_in_use(self, worker: str) -> bool:
        """True if a worker of this name is registered or left a processing list (same $DYNO and pid after a
        restart: the old dyno may still be shutting down, or may have crashed with a job in its list)."""
        with self.r.pipeline(transaction=False) as pipe:
            pipe.zscore(self.keys.workers, worker)
            pipe.exists(self.keys.processing(worker), self.keys.worker(worker))
            score, n = pipe.execute()
        return score is not None or n > 0

    def set_state(self, worker: str, state: str) -> None:
        self.r.hset(self.keys.worker(worker), "state", state)

    def heartbeat(self, worker: str) -> None:
        self.r.eval(_HEARTBEAT, 1, self.keys.workers, worker)

    def recover(self, skip: str = "") -> list:
        """Requeue the jobs of workers whose heartbeat expired; returns ``['requeued:<id>' | 'failed:<id>', ...]``."""
        c = self.cfg
        return self._recover(keys=[self.keys.workers],
                             args=[self.keys.prefix, int(c.heartbeat_ttl * 1000), c.max_attempts, c.failed_max,
                                   int(c.failed_ttl * 1000), skip])

    def unregister(self, worker: str) -> bool:
        k = self.keys
        return bool(self._unregister(keys=[k.workers, k.processing(worker), k.worker(worker)],
                                     args=[k.prefix, worker]))

    def wake_keys(self, queues) -> list:
        return [self.keys.wake(q) for q in queues]
