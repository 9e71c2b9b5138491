"""The Lua scripts behind the fetch contract (``fetch.py`` calls them; ``keys.py`` documents the keys).

Each script runs atomically in Redis. A script that raises half-way keeps its earlier writes, so every script is
written so that nothing after its first write can raise on bad data (``pcall`` around decoding, encoding and pushes
to keys of unknown type).

Invariant (issue 27 item 1): a key of the wrong type (a string where a list belongs, say) never makes a script raise
after its first write. Keys that hold jobs or must take an outcome (the processing list, P:scheduled for a retry,
P:failed and P:failed:data for a failure, a producer's queue) are TYPE-checked before the first write: a wrong one
refuses the whole call, writing nothing ({-3, key, type}; the claims stay in the processing list, for the worker to
try again or for recovery). Every other key (counters, P:queues, wake lists, status records, the worker hash, P:paused
as read) is used through ``redis.pcall``: a wrong type there skips that bookkeeping and is reported by name.
"""

# The failed registry (P:failed, P:failed:data): add a record, then trim what is past FAILED_TTL or beyond
# FAILED_MAX. Needs `prefix` and `now` in scope.
RECORD_FAILURE = r"""
local function record_failure(id, record, max_n, ttl_ms)
  local fz, fd = prefix .. ':failed', prefix .. ':failed:data'
  redis.call('ZADD', fz, now, id)  -- (fz and fd: TYPE-checked by the caller before its first write)
  redis.call('HSET', fd, id, record)
  redis.pcall('INCR', prefix .. ':stat:failed')
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

# Ring a queue's wake list for idle workers, once (a token already there is enough). Needs `prefix`.
WAKE_FN = r"""
local function wake(q)  -- (pcall: a wake list of the wrong type is a doorbell that does not ring, never an error)
  local k = prefix .. ':wake:' .. q
  if redis.pcall('LLEN', k) == 0 then redis.pcall('RPUSH', k, '1') end
end
"""

# Shared Lua helpers; every script but CYCLE starts with these.
PRELUDE = r"""
local prefix = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
""" + WAKE_FN + r"""-- Set bookkeeping fields without re-encoding the payload: cjson cannot tell [] from {} and would change the
-- job's own arguments, so the fields are appended as duplicate keys, which JSON decoders (Python's, cjson) resolve
-- to the last occurrence. Payloads are objects with at least an id, so the body before the final brace is never
-- empty. Growth is bounded: only recovery (at most MAX_ATTEMPTS times) and failed-retry append.
local function with_fields(p, fragment)
  local body = string.match(p, '^(.*)}%s*$')
  if not body then return p end
  return body .. ',' .. fragment .. '}'
end
-- A job's status record (P:job:<id>): written with pcall, so a key of the wrong type never aborts a script.
local function jset(id, ...)
  if id and id ~= '' then redis.pcall('HSET', prefix .. ':job:' .. id, ...) end
end
""" + RECORD_FAILURE

# KEYS: queue, queues-set, scheduled, dedupe key (P:enq:<id>).  ARGV: prefix, queue name, dedupe ttl ms,
#   when ('' = now, '+<ms>' = that long after Redis's clock, '@<ms>' = at that unix time), job name, n,
#   n job ids, then their n payloads (in the same order)
# Each job gets its status record P:job:<id> (status, name, queue, enqueued_at ms, attempts), without expiry until
# the job ends (the worker sets it then: RESULT_TTL, or FAILED_TTL for a failure).
# A call that redis-py re-sends after a timeout (its first copy may already have run, or may still be buffered in
# a stalled server) finds its dedupe key and does nothing: one key per call, not per job, so enqueue_many pays one
# SET per batch. Due times are computed here on the Redis clock, the one that moves scheduled jobs.
# Nothing may raise once the job is queued (an app that retries would enqueue it twice): the key that takes the job
# (its queue, or P:scheduled) is TYPE-checked before any write (a wrong one: an error reply, nothing written), and
# what follows the push (P:queues, the wake list, status records) uses pcall.
ENQUEUE = PRELUDE + r"""
local when, due = ARGV[4], nil
if when ~= '' then
  due = tonumber(string.sub(when, 2))
  if string.sub(when, 1, 1) == '+' then due = now + due end
end
local scheduled = due and due > now
local dest, want = KEYS[1], 'list'
if scheduled then dest, want = KEYS[3], 'zset' end
local got = redis.call('TYPE', dest)['ok']
if got ~= want and got ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. dest .. ' is a ' .. got .. ', expected a ' .. want .. ': nothing enqueued')
end
if not redis.call('SET', KEYS[4], '1', 'NX', 'PX', ARGV[3]) then return 0 end
local n = tonumber(ARGV[6])
local status = scheduled and 'scheduled' or 'queued'
for i = 7, 6 + n do
  jset(ARGV[i], 'status', status, 'name', ARGV[5], 'queue', ARGV[2], 'enqueued_at', scheduled and due or now,
       'attempts', 0)
end
if scheduled then
  for i = 7 + n, #ARGV do redis.call('ZADD', KEYS[3], due, ARGV[i]) end
  return 2
end
redis.call('RPUSH', KEYS[1], unpack(ARGV, 7 + n))
redis.pcall('SADD', KEYS[2], ARGV[2])
wake(ARGV[2])
return 1
"""

# One call per turn of the supervisor's loop: record the outcomes of finished jobs, refresh the heartbeat (when
# due), move due scheduled jobs (when asked: 'tidy'), and claim up to one job for each free slot.
# The hot path (a job's outcome plus the next claim) runs in this one call; what need not happen on every call is
# asked for by the worker: the beat every HEARTBEAT_INTERVAL, tidying at most every 100 ms and whenever it is idle.
#   KEYS[1] processing  P:processing:<w>      KEYS[2] workers   P:workers (score: this worker's deadline, ms)
#   KEYS[3] worker      P:worker:<w>          KEYS[4] scheduled P:scheduled
#   KEYS[5] paused      P:paused              KEYS[6] queues    P:queues
#   KEYS[7] epoch       P:epoch               KEYS[8] recovered P:recovered:<w> (read when beating)
#   ARGV[1] prefix   ARGV[2] worker name   ARGV[3] ttl_ms (the worker's own HEARTBEAT_TTL; '' = no beat this call)
#   ARGV[4] failed_max   ARGV[5] failed_ttl_ms   ARGV[6] wildcard ('1': every known queue, in name order)
#   ARGV[7] mode ('' = derive idle/busy/paused; else the state to show, e.g. 'stopping')   ARGV[8] busy (slots
#   still running after this call, not counting new claims)   ARGV[9] tidy ('1': move due scheduled jobs, and
#   ring the wake list of a queue this call left work in)   ARGV[10] epoch (P:epoch as the worker registered it;
#   '' = not checked)   ARGV[11] nq, then nq queue names in priority order
#   then nck, then nck pairs (slot, checkpoint JSON): running jobs' latest checkpoints, kept in the worker hash
#   (field ckpt:<slot>) so that recovery of a dyno killed outright can put them back with their progress;
#   '' clears the slot's (its job ended)
#   then nout, then nout outcomes of 8 fields each: op, slot, payload, job id ('' = keep no status), a, b, c,
#       started (ms, Redis clock: when it was claimed, as this script returned it; '' = read started:<slot>)
#       ack: a = result JSON ('' = none), b = ms to keep the status record ('0' = delete it now)
#       fail: a = failure record, b = ms to keep the status record, c = attempts
#       retry: a = new payload, b = delay ms, c = attempts
#       requeue: a = queue, b = the payload to put back ('' = unchanged; else it carries the checkpoint),
#                c = attempts for the status record ('' = unchanged: an interruption; else a run lost, issue 27)
# Status records (P:job:<id>, see keys.py) follow each outcome: done/failed/scheduled/queued (a running job is found
# in its worker's hash, job:<slot>, by get_job: no write per claim).
#   then the slot numbers to claim into (one claim per slot, as far as the queues go)
# The epoch is checked before the first write: if it differs, Redis lost its data since the worker registered,
# nothing is written and {-2} returned (the worker restores its registration and its claims, then calls again). The
# check is skipped only when the first outcome's job was still in the processing list (LREM, which writes nothing
# when it finds nothing, runs first): data lost since the claim would have taken the list with it.
# Wrong-typed keys (see the module's docstring): the processing list, and P:scheduled, P:failed, P:failed:data when
# an outcome of this call writes them, are TYPE-checked before the LREM; a wrong one returns {-3, key, its type} with
# nothing written (the worker holds back the outcomes that need that key and calls again without them). Every other
# key is written or read with pcall; those found wrong-typed are named in the reply (odd keys), and skipped.
# Returns {held (-1 when not beating), ms until the next scheduled job is due ('' if none; only when nothing was
#          claimed), now (ms), nclaims, recovered (when beating: 1 if P:recovered:<w> exists, i.e. another worker
#          took this one for dead and recovered its jobs; 2 if only its P:workers entry was gone; else 0), odd keys
#          ('' or key names joined by newlines), slot1, payload1, queue1, ..., queue names considered (only when
#          nothing was claimed)...}
# The worker hash also records, per claim, the queue it came from (queue:<slot>): recovery puts the job back there,
# whatever its payload's "queue" field says (issue 27 item 6).
# Cost: this runs once per job, so the hot path (one ack, one claim) is kept lean: no helper closures, few tables,
# no number formatting (Redis's clock is kept as a string for writes), and no GET of the epoch (see above).
CYCLE = r"""
local prefix, worker = ARGV[1], ARGV[2]
local processing, workers, wh, scheduled, paused, known = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local t = redis.call('TIME')
local now_s = t[1] .. string.sub('000' .. string.sub(t[2], 1, -4), -3)  -- ms, from the strings TIME returns
local now = tonumber(now_s)
local nq = tonumber(ARGV[11])
local ck = 12 + nq                            -- ARGV[ck]: nck
local oat = ck + 1 + 2 * tonumber(ARGV[ck])  -- ARGV[oat]: nout
local nout = tonumber(ARGV[oat])
local cat = oat + 1 + 8 * nout                -- ARGV[cat..]: slots to claim into
local got = redis.call('TYPE', processing)['ok']  -- types first: nothing is written yet (see above)
if got ~= 'list' and got ~= 'none' then return {-3, processing, got} end
for at = oat + 1, cat - 1, 8 do
  local op = ARGV[at]
  if op == 'retry' then
    got = redis.call('TYPE', scheduled)['ok']
    if got ~= 'zset' and got ~= 'none' then return {-3, scheduled, got} end
  elseif op == 'fail' then
    got = redis.call('TYPE', prefix .. ':failed')['ok']
    if got ~= 'zset' and got ~= 'none' then return {-3, prefix .. ':failed', got} end
    got = redis.call('TYPE', prefix .. ':failed:data')['ok']
    if got ~= 'hash' and got ~= 'none' then return {-3, prefix .. ':failed:data', got} end
  end
end
local first = nout > 0 and redis.call('LREM', processing, -1, ARGV[oat + 3]) or 0
if ARGV[10] ~= '' and first ~= 1 then  -- no write yet
  local e = redis.pcall('GET', KEYS[7])
  if type(e) == 'table' then return {-3, KEYS[7], redis.call('TYPE', KEYS[7])['ok']} end
  if e ~= ARGV[10] then return {-2} end
end
local tidy = ARGV[9] == '1'
local odd = nil  -- keys found wrong-typed (and skipped), for the reply
""" + WAKE_FN + r"""-- The first LREM above may already have written: from here on, a bookkeeping key of the wrong type must not make
-- the script raise before the outcomes are recorded (pcall), or the job would be in no list at all.
local readded = false
if ARGV[3] ~= '' then
  readded = redis.pcall('ZADD', workers, now + tonumber(ARGV[3]), worker)
  if type(readded) == 'table' then odd = workers end
  readded = readded == 1
end
for at = ck + 1, oat - 1, 2 do
  if ARGV[at + 1] == '' then
    redis.pcall('HDEL', wh, 'ckpt:' .. ARGV[at])
  else
    redis.pcall('HSET', wh, 'ckpt:' .. ARGV[at], ARGV[at + 1])
  end
end
for at = oat + 1, cat - 1, 8 do
  local op, slot, payload, id = ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  -- The outcome takes effect only if the job is still ours: a call repeated after a lost reply, or a job already
  -- recovered by another worker, records nothing twice.
  local removed = first
  if at > oat + 1 then removed = redis.call('LREM', processing, -1, payload) end
  if removed == 1 then
    local a, b, c, started = ARGV[at + 4], ARGV[at + 5], ARGV[at + 6], ARGV[at + 7]
    local jk = prefix .. ':job:' .. id
    if started == '' and id ~= '' and (op == 'ack' or op == 'fail') then
      started = redis.pcall('HGET', wh, 'started:' .. slot)
      if type(started) ~= 'string' then started = now_s end
    end
    -- status records are written with pcall: a key of the wrong type never aborts the script
    if op == 'ack' then
      if type(redis.pcall('INCR', prefix .. ':stat:processed')) == 'table' then
        odd = (odd and odd .. '\n' or '') .. prefix .. ':stat:processed'
      end
      if id ~= '' then
        if b ~= '0' then
          redis.pcall('HSET', jk, 'status', 'done', 'ended_at', now_s, 'result', a, 'worker', worker,
                      'started_at', started)
          redis.pcall('PEXPIRE', jk, b)
        else
          redis.call('DEL', jk)
        end
      end
    elseif op == 'fail' then
""" + RECORD_FAILURE + r"""      record_failure(id, a, tonumber(ARGV[4]), tonumber(ARGV[5]))
      if id ~= '' then
        redis.pcall('HSET', jk, 'status', 'failed', 'ended_at', now_s, 'attempts', c, 'worker', worker,
                    'started_at', started)
        redis.pcall('PEXPIRE', jk, b)
      end
    elseif op == 'retry' then
      redis.call('ZADD', scheduled, now + tonumber(b), a)
      if id ~= '' then redis.pcall('HSET', jk, 'status', 'scheduled', 'attempts', c) end
    elseif op == 'requeue' then
      local back = (b ~= '') and b or payload
      local pushed = redis.pcall('LPUSH', prefix .. ':queue:' .. a, back)
      if type(pushed) == 'number' then
        wake(a)
        if type(redis.pcall('SADD', known, a)) == 'table' then  -- a QUEUES=* worker finds it (P:queues may be
          odd = (odd and odd .. '\n' or '') .. known             -- gone with lost data)
        end
      else  -- its queue is not a list: the claim stays (processing: TYPE-checked above)
        redis.call('RPUSH', processing, payload)
        odd = (odd and odd .. '\n' or '') .. prefix .. ':queue:' .. a
      end
      if id ~= '' and c ~= '' then redis.pcall('HSET', jk, 'status', 'queued', 'attempts', c)
      elseif id ~= '' then redis.pcall('HSET', jk, 'status', 'queued') end
    end
  end
end
local due = tidy and redis.pcall('ZRANGEBYSCORE', scheduled, '-inf', now, 'LIMIT', 0, 100) or {}
if due.err then due, odd = {}, (odd and odd .. '\n' or '') .. scheduled end
if tidy then  -- due scheduled jobs (retries, enqueue_in/at) move to their queues; ZREM makes each move happen once
  for _, p in ipairs(due) do
    local ok, doc = pcall(cjson.decode, p)
    -- the queue it names; read without cjson if cjson cannot (a foreign producer's lone surrogate escape)
    local q = (ok and type(doc) == 'table' and type(doc['queue']) == 'string') and doc['queue']
      or string.match(p, '"queue":"([%w_%.:%-]+)"') or 'default'
    -- push first, and only then remove from the schedule: a queue key of the wrong type leaves the job scheduled
    -- (visible in status) instead of raising half-way through this script and losing it
    local pushed = redis.pcall('RPUSH', prefix .. ':queue:' .. q, p)
    if type(pushed) == 'number' then
      redis.call('ZREM', scheduled, p)  -- (a zset: ZRANGEBYSCORE read it)
      redis.pcall('SADD', known, q)
      wake(q)
      local id = string.match(p, '^{"id":"([%w_%-]+)"')
      if id then redis.pcall('HSET', prefix .. ':job:' .. id, 'status', 'queued') end
    end
  end
end
local queues = (ARGV[6] == '1') and redis.pcall('SORT', known, 'ALPHA') or nil  -- else ARGV[12 .. 11 + nq]
if queues and queues.err then queues, odd = {}, (odd and odd .. '\n' or '') .. known end
local nqs = queues and #queues or nq
local res, wf = {0, '', now, 0, 0, ''}, {}  -- wf: the worker hash's fields, written once at the end
local claimed, anyopen, left = 0, false, nil  -- left: queues we took from (only when tidying)
local first_claim = cat
if cat <= #ARGV and nqs > 0 then  -- one look at the pause set: '*' (all) and each queue
  local p
  if queues then p = redis.pcall('SMISMEMBER', paused, '*', unpack(queues))
  else p = redis.pcall('SMISMEMBER', paused, '*', unpack(ARGV, 12, 11 + nq)) end
  if p.err then p, odd = {1}, (odd and odd .. '\n' or '') .. paused end  -- unreadable: claim nothing
  local i = 1
  while p[1] == 0 and i <= nqs and cat <= #ARGV do
    local q = queues and queues[i] or ARGV[11 + i]
    local v = false
    if p[i + 1] == 0 then
      anyopen = true
      v = redis.pcall('LMOVE', prefix .. ':queue:' .. q, processing, 'LEFT', 'RIGHT')
      if type(v) == 'table' then v, odd = false, (odd and odd .. '\n' or '') .. prefix .. ':queue:' .. q end
    end
    if v then
      -- (the job's status record is not touched here: get_job finds a running job in its worker's slots)
      local slot = ARGV[cat]
      wf[#wf + 1], wf[#wf + 2], wf[#wf + 3], wf[#wf + 4] = 'job:' .. slot, v, 'started:' .. slot, now_s
      wf[#wf + 1], wf[#wf + 2] = 'queue:' .. slot, q  -- where recovery puts it back
      res[#res + 1], res[#res + 2], res[#res + 3] = slot, v, q
      claimed, cat = claimed + 1, cat + 1
      if tidy then left = left or {}; left[q] = true end
    else
      if left then left[q] = nil end
      i = i + 1
    end
  end
end
if left then  -- we took work and left some behind: ring for the next idle worker (when tidying)
  for q in pairs(left) do
    if redis.call('LLEN', prefix .. ':queue:' .. q) > 0 then wake(q) end
  end
end
local state = ARGV[7]
if state == '' then
  if claimed > 0 or ARGV[8] ~= '0' then state = 'busy'
  elseif nqs > 0 and not anyopen and cat <= #ARGV then state = 'paused'
  else state = 'idle' end
end
wf[#wf + 1], wf[#wf + 2] = 'state', state
if ARGV[3] ~= '' then wf[#wf + 1], wf[#wf + 2] = 'seen', now_s end
local freed = nil  -- slots whose job ended: their job:/started: fields go, unless this call claimed into them
for at = oat + 2, first_claim - 1, 8 do
  local slot, again = ARGV[at], false
  for c = first_claim, cat - 1 do
    if ARGV[c] == slot then again = true end
  end
  if not again then
    freed = freed or {}
    freed[#freed + 1], freed[#freed + 2], freed[#freed + 3] = 'job:' .. slot, 'started:' .. slot, 'queue:' .. slot
  end
end
if freed then redis.pcall('HDEL', wh, unpack(freed)) end
if type(redis.pcall('HSET', wh, unpack(wf))) == 'table' then odd = (odd and odd .. '\n' or '') .. wh end
res[1], res[4] = (ARGV[3] ~= '') and redis.call('LLEN', processing) or -1, claimed  -- held: counted with beats
if ARGV[3] ~= '' then  -- taken for dead: our jobs were recovered (1), or at least our registration is gone (2)
  res[5] = (redis.call('EXISTS', KEYS[8]) == 1) and 1 or (readded and 2 or 0)
end
if claimed == 0 then
  local nxt = redis.pcall('ZRANGE', scheduled, 0, 0, 'WITHSCORES')
  res[2] = nxt[2] and tostring(math.max(0, tonumber(nxt[2]) - now)) or ''  -- ms from now, on Redis's clock
  if nxt.err and not tidy then odd = (odd and odd .. '\n' or '') .. scheduled end
  for i = 1, nqs do res[#res + 1] = queues and queues[i] or ARGV[11 + i] end
end
res[6] = odd or ''
return res
"""

# Recovery of dead workers' jobs.
#   KEYS[1] workers P:workers   KEYS[2] suspects P:suspects
#   ARGV[1] prefix   ARGV[2] ttl_ms (ours: only for workers of an older version, see below)   ARGV[3] max_attempts
#   ARGV[4] failed_max   ARGV[5] failed_ttl_ms   ARGV[6] skip (our own name)   ARGV[7] slack_ms (see below)
# A worker's score in P:workers is its own deadline (last beat + its own HEARTBEAT_TTL, written by itself), so every
# worker is judged by its own settings. Workers of an older version wrote their last beat instead and have no
# 'ttl' field: for them the recovering worker's ttl_ms still applies.
# Late is not yet dead. A worker past its deadline is first marked (P:suspects: its score and when it was first
# seen late) and is dead only once it has stayed late, with the same score, for its grace: its own interval
# (field 'interval', 0 if unknown) + slack_ms. This is what keeps a live worker's job from running twice after a
# Redis stall: a RECOVER call queued while Redis was paused runs the moment it resumes, possibly before the owners'
# queued heartbeats, and everyone's deadline looks past; marking costs nothing, and the owners beat within their
# interval of the resumption. The same holds however long the stall, since grace counts from the first sighting.
# A dead worker's jobs are recorded in P:recovered:<w> (their ids, and '' even when it held none) before its keys
# go: if it was only stalled, its next beat finds that set and it kills its own runs of them (see lua.CYCLE).
# Returns {wait, 'requeued:<id>' | 'failed:<id>' ...}: wait = ms until the earliest mark's grace ends ('' if none).
# Any producer can write a payload, so no value in one may make this script raise after its first write (an error
# half-way keeps the earlier writes: the dead worker would never be removed, its earlier items would be pushed again
# on every pass and later dead workers never recovered). Hence: every value read from a payload is checked before
# use (attempts must be a finite integer), every encode is under pcall with a fallback that cannot fail, pushes and
# wake-ups to keys a payload chooses use redis.pcall, and each item leaves the processing list (RPOP) right after
# its outcome is written, so even an unforeseen error cannot duplicate what was already handled.
# Wrong-typed keys: P:workers, P:suspects, P:failed and P:failed:data are TYPE-checked before the first write (a
# wrong one: {'wrongtype', key, type}, nothing written); a dead worker whose processing list is not a list is left
# as it is (item 'wrongtype:<key>'); every other key is used through pcall.
# A job goes back to the queue it was claimed from (queue:<slot> in the dead worker's hash), else the one its
# payload names, else 'default'. The fields recovery adds (attempts, errors, checkpoint) follow a marker
# "_rt":<offset of the fragment> and replace the previous recovery's fragment instead of piling up beside it: a job
# recovered many times never carries duplicate keys, and its history is bounded (11 entries of short fields).
RECOVER = PRELUDE + r"""
local workers, suspects, skip, slack = KEYS[1], KEYS[2], ARGV[6], tonumber(ARGV[7])
for _, kt in ipairs({{workers, 'zset'}, {suspects, 'hash'}, {prefix .. ':failed', 'zset'},
                     {prefix .. ':failed:data', 'hash'}}) do
  local got = redis.call('TYPE', kt[1])['ok']
  if got ~= kt[2] and got ~= 'none' then return {'wrongtype', kt[1], got} end
end
local RECOVERED_TTL_MS = 86400000  -- P:recovered:<w> lives a day: a worker stalled longer may run its copy on
local late = redis.call('ZRANGEBYSCORE', workers, '-inf', now, 'WITHSCORES', 'LIMIT', 0, 100)
local dead, wait = {}, nil
for n = 1, #late, 2 do
  local w, score = late[n], late[n + 1]
  local f = redis.pcall('HMGET', prefix .. ':worker:' .. w, 'ttl', 'interval')
  if type(f) ~= 'table' then f = {} end
  if w ~= skip and (f[1] or tonumber(score) < now - tonumber(ARGV[2])) then
    local grace = (tonumber(f[2]) or 0) + slack
    local mark = redis.call('HGET', suspects, w)
    local marked, first = nil, nil
    if mark then marked, first = string.match(mark, '^(.*)@(%d+)$') end
    if marked ~= score or tonumber(first) > now then  -- (a mark from the future: Redis's clock stepped back)
      first = now
      redis.call('HSET', suspects, w, score .. '@' .. now)
    end
    local left = tonumber(first) + grace - now
    if left <= 0 then
      dead[#dead + 1] = w
    elseif not wait or left < wait then
      wait = left
    end
  end
end
local max_attempts = tonumber(ARGV[3])
local out = {}
local function safe_wake(q)
  local k = prefix .. ':wake:' .. q
  if redis.pcall('LLEN', k) == 0 then redis.pcall('RPUSH', k, '1') end
end
-- the queue a payload names, read without cjson (which refuses e.g. lone surrogate escapes): queue names
-- follow the QUEUES rule, so the first "queue":"<name>" at the top level of a payload we wrote is it
local function raw_queue(p)
  local q = string.match(p, '"queue":"([%w_%.:%-]+)"')
  if q and #q <= 100 then return q end
  return ''
end
local function encode(v, fallback)
  local ok, s = pcall(cjson.encode, v)
  if ok then return s end
  return fallback
end
-- a history entry as recovery carries it: known fields only, short (a foreign producer's entries may be anything)
local function entry(e)
  if type(e) ~= 'table' then return nil end
  local out = {}
  for _, f in ipairs({'at', 'worker', 'cause', 'type', 'message'}) do
    local v = e[f]
    if type(v) == 'string' then out[f] = string.sub(v, 1, 500)
    elseif type(v) == 'number' and v == v and v > -1e15 and v < 1e15 then out[f] = v end
  end
  return out
end
-- the payload without the fragment an earlier recovery appended (see above), when that fragment is there
local function base(p, doc)
  local at = doc['_rt']
  if type(at) ~= 'number' or at ~= math.floor(at) or at < 2 or at >= #p then return p end
  local mark = ',"_rt":' .. string.format('%d', at) .. ','
  if string.sub(p, at + 1, at + #mark) ~= mark then return p end
  return string.sub(p, 1, at) .. '}'
end
for _, w in ipairs(dead) do
  local pk = prefix .. ':processing:' .. w
  local ptype = redis.call('TYPE', pk)['ok']
  if ptype ~= 'list' and ptype ~= 'none' then
    out[#out + 1] = 'wrongtype:' .. pk  -- left as it is: nothing here can be read as jobs
  else
    local gone = prefix .. ':recovered:' .. w  -- what it held, for the worker itself if it was only stalled
    -- the checkpoints its running jobs last reported (ckpt:<slot> beside job:<slot> in its hash), by payload
    local ckpt, from = {}, {}  -- and the queue it was claimed from (queue:<slot>), by payload
    local info = redis.pcall('HGETALL', prefix .. ':worker:' .. w)
    if type(info) == 'table' and not info.err then
      local f = {}
      for n = 1, #info, 2 do f[info[n]] = info[n + 1] end
      for k, v in pairs(f) do
        local slot = string.match(k, '^job:(%d+)$')
        if slot and f['ckpt:' .. slot] then ckpt[v] = f['ckpt:' .. slot] end
        if slot and f['queue:' .. slot] then from[v] = f['queue:' .. slot] end
      end
    end
    local items = redis.call('LRANGE', pk, 0, -1)
    for i = #items, 1, -1 do
      local p = items[i]
      local ok, doc = pcall(cjson.decode, p)
      if ok and type(doc) == 'table' and type(doc['id']) == 'string' then
        local id = doc['id']
        redis.pcall('SADD', gone, id)
        local q = from[p] or doc['queue']
        if type(q) ~= 'string' or q == '' then q = 'default' end
        -- attempts: an integer >= 0 (else 0, as the worker reads it), at most MAX_ATTEMPTS: inf, NaN, 2.5 or
        -- "7" cannot leak into string concatenation or cjson.encode
        local a = doc['attempts']
        if type(a) ~= 'number' or a ~= a or a < 0 or a ~= math.floor(a) then a = 0 end
        if a > max_attempts then a = max_attempts end
        a = a + 1
        local astr = string.format('%d', a)
        local hist = {}
        if type(doc['errors']) == 'table' then
          local old = doc['errors']
          for k = math.max(1, #old - 9), #old do hist[#hist + 1] = entry(old[k]) end
        end
        hist[#hist + 1] = {at = now / 1000, worker = w, cause = 'lost',
                           message = 'worker vanished (heartbeat expired) while running the job'}
        local lost = '[{"at":' .. string.format('%.3f', now / 1000) .. ',"worker":' .. encode(w, '""') ..
                     ',"cause":"lost","message":"worker vanished; history unreadable"}]'
        local hjson = encode(hist, lost)
        if hjson == lost then hist = cjson.decode(lost) end
        local pushed = false
        if a < max_attempts then
          local b = base(p, doc)
          local at = string.format('%d', #b - 1)  -- where the fragment begins: after the body, before its ','
          pushed = type(redis.pcall('LPUSH', prefix .. ':queue:' .. q,
                   with_fields(b, '"_rt":' .. at .. ',"attempts":' .. astr .. ',"errors":' .. hjson ..
                               (ckpt[p] and (',"checkpoint":' .. ckpt[p]) or '')))) == 'number'
        end
        if pushed then
          safe_wake(q)
          redis.pcall('SADD', prefix .. ':queues', q)
          jset(id, 'status', 'queued', 'attempts', a)
          out[#out + 1] = 'requeued:' .. id
        else  -- out of attempts (or its queue key is unusable): the failed registry keeps it
          local msg = 'worker vanished ' .. astr .. ' times while running the job (MAX_ATTEMPTS)'
          local rec = encode({id = id, name = tostring(doc['name']), queue = q, payload = p,
            cause = 'lost', type = 'WorkerLost', worker = w, attempts = a, failed_at = now / 1000,
            message = msg, traceback = '', history = hist}, nil)
          if not rec then  -- cannot happen with the checks above; never abort on it
            rec = encode({id = id, name = '', queue = q, payload = p, cause = 'lost', type = 'WorkerLost',
              worker = w, attempts = a, failed_at = now / 1000, message = msg, traceback = '', history = {}},
              '{"id":' .. encode(id, '""') .. ',"cause":"lost","type":"WorkerLost","message":"unencodable"}')
          end
          record_failure(id, rec, tonumber(ARGV[4]), tonumber(ARGV[5]))
          jset(id, 'status', 'failed', 'ended_at', now, 'attempts', a)
          redis.pcall('PEXPIRE', prefix .. ':job:' .. id, ARGV[5])
          out[#out + 1] = 'failed:' .. id
        end
      else
        local id = redis.sha1hex(p)
        local rec = encode({id = id, name = '', queue = raw_queue(p), payload = p, cause = 'bad_payload',
          type = 'BadJob', worker = w, attempts = 1, failed_at = now / 1000, traceback = '', history = {},
          message = 'unreadable payload left by a vanished worker'},
          '{"id":"' .. id .. '","cause":"bad_payload","type":"BadJob","message":"unreadable payload"}')
        record_failure(id, rec, tonumber(ARGV[4]), tonumber(ARGV[5]))
        out[#out + 1] = 'failed:' .. id
      end
      redis.call('RPOP', pk)  -- handled: items[i] is the list's tail
    end
    redis.pcall('SADD', gone, '')
    redis.pcall('PEXPIRE', gone, RECOVERED_TTL_MS)
    redis.call('DEL', pk, prefix .. ':worker:' .. w)
    redis.call('ZREM', workers, w)
  end
end
-- drop marks that no longer hold: the worker beat again (a new score), left, or was recovered just now
if redis.call('HLEN', suspects) > 0 then
  local marks = redis.call('HGETALL', suspects)
  for n = 1, #marks, 2 do
    local score = redis.call('ZSCORE', workers, marks[n])
    if not score or string.match(marks[n + 1], '^(.*)@') ~= score then redis.call('HDEL', suspects, marks[n]) end
  end
end
table.insert(out, 1, wait and tostring(wait) or '')
return out
"""

# KEYS: workers, processing, worker-hash.  ARGV: prefix, worker.  Leaves the worker registered (so recovery finds
# it after the TTL) if its processing list is not empty: an unacknowledged job is never dropped by exiting.
UNREGISTER = PRELUDE + r"""
if redis.call('LLEN', KEYS[2]) > 0 then
  redis.call('HSET', KEYS[3], 'state', 'exited')
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[3])
return 1
"""

# KEYS: workers, worker-hash.  ARGV: worker, ttl_ms.  Heartbeats use the Redis clock, shared by every dyno; the score
# is the worker's deadline (now + its own HEARTBEAT_TTL), 'seen' the time of the beat.
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], 'seen', now)
"""

# KEYS: wake lists.  One token at most per list: a wake list is a doorbell, not a counter.
WAKE = "for _, k in ipairs(KEYS) do if redis.call('LLEN', k) == 0 then redis.call('RPUSH', k, '1') end end"

# Periodic jobs (``schedule.py``): claim the due tick of each schedule and enqueue its job, in one atomic call, so
# any number of workers calling it for the same tick enqueue it once.
#   KEYS[1] paused P:paused   KEYS[2] queues P:queues   KEYS[3] schedules P:schedules (name -> last seen, ms)
#   ARGV[1] prefix, then 8 per schedule: name, queue, tick (ms: the latest tick at or before now, as the worker
#   computed it), next (the tick after), grace ms, ttl ms of P:sched:<name>, spec (for status), payload
# P:sched:<name> HASH: tick (highest tick claimed: only ever raised), last (last tick enqueued), skipped + reason
#   (last tick not enqueued: 'late' = older than grace, 'paused'), next, spec, queue; written, and its expiry set to
#   ttl, by the call that claims a tick. P:schedules is pruned of names no worker has written for 30 days.
# Returns {now, code per schedule}: enqueued | taken (claimed already) | late | paused | skew (the tick is not the
#   latest by Redis's clock: nothing written, the worker retries with its estimate corrected) | an error text
SCHEDULE = r"""
local prefix = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all_paused = redis.call('SISMEMBER', KEYS[1], '*') == 1
local res = {now}
for i = 2, #ARGV, 8 do
  local name, q, tick, nxt = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local grace, ttl, spec, payload = tonumber(ARGV[i + 4]), ARGV[i + 5], ARGV[i + 6], ARGV[i + 7]
  local h = prefix .. ':sched:' .. name
  local code
  if tick > now or nxt <= now then
    code = 'skew'
  else
    local prev = tonumber(redis.call('HGET', h, 'tick') or '-1') or -1
    if tick <= prev then
      code = 'taken'
    elseif all_paused or redis.call('SISMEMBER', KEYS[1], q) == 1 then
      code = 'paused'
    elseif now - tick > grace then
      code = 'late'
    else
      local pushed = redis.pcall('RPUSH', prefix .. ':queue:' .. q, payload)
      if type(pushed) == 'number' then
        code = 'enqueued'
        redis.call('SADD', KEYS[2], q)
        local k = prefix .. ':wake:' .. q
        if redis.call('LLEN', k) == 0 then redis.call('RPUSH', k, '1') end
        redis.call('HSET', h, 'tick', tick, 'last', tick)
      else
        code = 'cannot push to ' .. q .. ': ' .. tostring(pushed.err)
      end
    end
    if code == 'late' or code == 'paused' then redis.call('HSET', h, 'tick', tick, 'skipped', tick, 'reason', code) end
    if code ~= 'taken' then  -- whoever claims a tick writes what status shows; a check that finds it taken writes nothing
      redis.call('HSET', h, 'next', nxt, 'spec', spec, 'queue', q)
      redis.call('PEXPIRE', h, ttl)
      redis.call('ZADD', KEYS[3], now, name)
      redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - 30 * 86400000)
    end
  end
  res[#res + 1] = code
end
return res
"""
