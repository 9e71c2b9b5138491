-- RECOVER: requeue the jobs of dead workers (late past their grace), once however many workers call it at once.
-- KEYS[1] prefix    P            the key space's root; derived from it: P:failed, P:failed:data, P:stat:failed,
--                                and for each dead worker <w>: P:worker:<w>, P:processing:<w>, P:recovered:<w>; for
--                                each job: P:queue:<q>, P:wake:<q>, P:queues, P:job:<id>, P:unique:<key> (a job
--                                of unique_until="start" put back takes its key back if free: prelude)
--                                each job: P:queue:<q>, P:wake:<q>, P:queues, P:job:<id>, and for a limited one
--                                (issue 25) P:running:<name>, P:held:<name>
--                                each job: P:queue:<q>, P:wake:<q>, P:queues, P:job:<id>; for a group's member or
--                                callback: P:group:<gid>, P:group_res:<gid>, P:group_ids:<gid>
-- KEYS[2] workers   P:workers    worker name -> its deadline (ms; workers of an older version: their last beat)
-- KEYS[3] suspects  P:suspects   late worker -> "<its score>@<ms when first seen late>"
-- ARGV[1] ttl_ms        ours: only for workers of an older version, which have no 'ttl' field (see below)
-- ARGV[2] max_attempts  MAX_ATTEMPTS
-- ARGV[3] failed_max    FAILED_MAX
-- ARGV[4] failed_ttl    FAILED_TTL in ms
-- ARGV[5] skip          our own name (never judged)
-- ARGV[6] slack_ms      added to a late worker's interval to make its grace
-- ARGV[7] keep_ms       how long a job canceled here keeps its status record (RESULT_TTL, ms; '0': deleted)
-- ARGV[8..] pairs       (issue 25) the caller's job names, each with its concurrency ('' = none): held jobs of
--                       theirs go back to their queues as far as that leaves room (all of them: no limit now)
-- Reply: {wait, 'requeued:<id>' | 'failed:<id>' | 'canceled:<id>' | 'wrongtype:<key>' ...}: wait = ms until the earliest mark's
--   grace ends ('' if none); or {'wrongtype', key, type} with nothing written.
-- Invariants:
-- * A worker's score in P:workers is its own deadline (last beat + its own HEARTBEAT_TTL), so every worker is
--   judged by its own settings. Late is not yet dead: a worker past its deadline is first marked (P:suspects) and
--   is dead only once it has stayed late, with the same score, for its grace: its own interval (field 'interval',
--   0 if unknown) + slack_ms. A RECOVER call queued while Redis was paused runs the moment it resumes, possibly
--   before the owners' queued heartbeats; marking costs nothing, and the owners beat within their interval. Grace
--   counts from the first sighting, so this holds however long the stall.
-- * A dead worker's jobs are recorded in P:recovered:<w> (their ids, and '' even when it held none) before its keys
--   go: if it was only stalled, its next beat finds that set and it kills its own runs of them (see cycle.lua).
-- * Any producer can write a payload, so no value in one may make this script raise after its first write (an
--   error half-way keeps the earlier writes: the dead worker would never be removed, its earlier items would be
--   pushed again on every pass). Hence: every value read from a payload is checked before use (attempts must be a
--   finite integer), every encode is under pcall with a fallback that cannot fail, pushes and wake-ups to keys a
--   payload chooses use redis.pcall, and each item leaves the processing list (RPOP) right after its outcome is
--   written, so even an unforeseen error cannot duplicate what was already handled.
-- * Wrong-typed keys: P:workers, P:suspects, P:failed and P:failed:data are TYPE-checked before the first write (a
--   wrong one: {'wrongtype', key, type}, nothing written); a dead worker whose processing list is not a list is left
--   as it is (item 'wrongtype:<key>'); every other key is used through pcall.
-- * A job cancel(running=True) asked the dead worker to stop (its id in P:cancel:<w>, which that worker never read)
--   is not put back: it ends canceled, its waiter notified (adversarial review of issue 24). P:cancel:<w> goes.
-- * A job's concurrency slot (issue 25: its '<slot>:<w>' entry in P:running:<name>) is freed, whatever becomes of
--   the job (put back, written off at MAX_ATTEMPTS, canceled), and one job held back by that limit goes back to the
--   head of its queue; entries of a worker gone from P:workers are also dropped by the claim (cycle.lua).
-- * A group's member written off here (failed at MAX_ATTEMPTS, or canceled) is recorded in its group in this call,
--   once (prelude group_end; the last member queues the callback); a member put back is not an end.
-- * A job goes back to the queue it was claimed from (queue:<slot> in the dead worker's hash), else the one its
--   payload names, else 'default'. The fields recovery adds (attempts, errors, checkpoint) follow a marker
--   "_rt":<offset of the fragment> and replace the previous recovery's fragment instead of piling up beside it: a
--   job recovered many times never carries duplicate keys, and its history is bounded (11 entries of short fields).
local prefix, workers, suspects = KEYS[1], KEYS[2], KEYS[3]
local ttl_ms, max_attempts, failed_max = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local failed_ttl, skip, slack = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local keep_ms, failed_ttl_s = ARGV[7] or ARGV[4], ARGV[4]
local now = clock()
for _, kt in ipairs({{workers, 'zset'}, {suspects, 'hash'}, {prefix .. ':failed', 'zset'},
                     {prefix .. ':failed:data', 'hash'}}) do
  local got = wrong_type(kt[1], kt[2])
  if got then return {'wrongtype', kt[1], got} end
end
local RECOVERED_TTL_MS = 86400000  -- P:recovered:<w> lives a day: a worker stalled longer may run its copy on
local late = redis.call('ZRANGEBYSCORE', workers, '-inf', now, 'WITHSCORES', 'LIMIT', 0, 100)
local dead, wait = {}, nil
for n = 1, #late, 2 do
  local w, score = late[n], late[n + 1]
  local f = redis.pcall('HMGET', prefix .. ':worker:' .. w, 'ttl', 'interval')
  if type(f) ~= 'table' then f = {} end
  if w ~= skip and (f[1] or tonumber(score) < now - ttl_ms) then
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
local out = {}
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
    local ckpt, from, slot_of = {}, {}, {}  -- and the queue it was claimed from (queue:<slot>), its slot, by payload
    local info = redis.pcall('HGETALL', prefix .. ':worker:' .. w)
    if type(info) == 'table' and not info.err then
      local f = {}
      for n = 1, #info, 2 do f[info[n]] = info[n + 1] end
      for k, v in pairs(f) do
        local slot = string.match(k, '^job:(%d+)$')
        if slot and f['ckpt:' .. slot] then ckpt[v] = f['ckpt:' .. slot] end
        if slot and f['queue:' .. slot] then from[v] = f['queue:' .. slot] end
        if slot then slot_of[v] = slot end
      end
    end
    local ck = prefix .. ':cancel:' .. w  -- jobs cancel(running=True) asked it to stop: they end canceled here
    local stop = {}
    local asked = redis.pcall('SMEMBERS', ck)
    for _, id in ipairs((type(asked) == 'table' and not asked.err) and asked or {}) do stop[id] = true end
    local items = redis.call('LRANGE', pk, 0, -1)
    for i = #items, 1, -1 do
      local p = items[i]
      local ok, doc = pcall(cjson.decode, p)
      if ok and type(doc) == 'table' and type(doc['id']) == 'string' then
        local id = doc['id']
        redis.pcall('SADD', gone, id)
        local nm = doc['name']  -- its run no longer counts against its concurrency limit (issue 25)
        if type(nm) == 'string' and slot_of[p]
            and redis.pcall('HDEL', prefix .. ':running:' .. nm, slot_of[p] .. ':' .. w) == 1 then
          release_held(prefix, nm, 1, nil)
        end
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
        if stop[id] then
          local jk = prefix .. ':job:' .. id
          if redis.call('PTTL', jk) > 0 then notify(prefix, id, 'canceled', '') end  -- a waiter's mark (await.lua)
          jset(prefix, id, 'status', 'canceled', 'ended_at', now, 'worker', w)
          if keep_ms ~= '0' then redis.pcall('PEXPIRE', jk, keep_ms) else redis.pcall('DEL', jk) end
          local kind, gid = group_of(p, id)
          if gid and kind == 'group' then group_end(prefix, gid, id, 'canceled', '', tostring(now))
          elseif gid then group_close(prefix, gid, keep_ms) end
          out[#out + 1] = 'canceled:' .. id
        elseif a < max_attempts then
          local b = base(p, doc)
          local at = string.format('%d', #b - 1)  -- where the fragment begins: after the body, before its ','
          pushed = type(redis.pcall('LPUSH', prefix .. ':queue:' .. q,
                   with_fields(b, '"_rt":' .. at .. ',"attempts":' .. astr .. ',"errors":' .. hjson ..
                               (ckpt[p] and (',"checkpoint":' .. ckpt[p]) or '')))) == 'number'
        end
        if stop[id] then
          -- (ended above)
        elseif pushed then
          wake(prefix, q)
          redis.pcall('SADD', prefix .. ':queues', q)
          jset(prefix, id, 'status', 'queued', 'attempts', a)
          unique_retake(prefix, id)
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
          record_failure(prefix, now, id, rec, failed_max, failed_ttl)
          jset(prefix, id, 'status', 'failed', 'ended_at', now, 'attempts', a)
          redis.pcall('PEXPIRE', prefix .. ':job:' .. id, failed_ttl)
          local kind, gid = group_of(p, id)  -- written off: a group's member counts as failed (issue 25 item 4)
          if gid and kind == 'group' then group_end(prefix, gid, id, 'failed', rec, tostring(now))
          elseif gid then group_close(prefix, gid, failed_ttl_s) end
          out[#out + 1] = 'failed:' .. id
        end
      else
        local id = redis.sha1hex(p)
        local rec = encode({id = id, name = '', queue = raw_queue(p), payload = p, cause = 'bad_payload',
          type = 'BadJob', worker = w, attempts = 1, failed_at = now / 1000, traceback = '', history = {},
          message = 'unreadable payload left by a vanished worker'},
          '{"id":"' .. id .. '","cause":"bad_payload","type":"BadJob","message":"unreadable payload"}')
        record_failure(prefix, now, id, rec, failed_max, failed_ttl)
        out[#out + 1] = 'failed:' .. id
      end
      redis.call('RPOP', pk)  -- handled: items[i] is the list's tail
    end
    redis.pcall('SADD', gone, '')
    redis.pcall('PEXPIRE', gone, RECOVERED_TTL_MS)
    redis.call('DEL', pk, prefix .. ':worker:' .. w, ck)
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
-- jobs held back by a concurrency limit that no end of a run would release any more (issue 25): the limit was
-- raised or removed by a deploy, or runs ended without their entries (a claim whose reply was lost, a dead worker
-- whose slots were unreadable), whose entries go here once their worker is gone from P:workers
for at = 8, #ARGV - 1, 2 do
  local name, conc = ARGV[at], tonumber(ARGV[at + 1])
  local n = redis.pcall('LLEN', prefix .. ':held:' .. name)
  if type(n) == 'number' and n > 0 then
    if conc then  -- room: the limit less the runs of live workers (entries of gone ones are dropped here)
      local rk, busy = prefix .. ':running:' .. name, 0
      local all = redis.pcall('HGETALL', rk)
      for i = 1, (all.err and 0 or #all), 2 do
        local w = string.match(all[i], '^%-?%d+:(.*)$')
        if w and redis.pcall('ZSCORE', workers, w) == false then redis.pcall('HDEL', rk, all[i])
        else busy = busy + 1 end
      end
      n = all.err and 0 or math.min(n, conc - busy)
    end
    if n > 0 then release_held(prefix, name, math.min(n, 1000), nil) end
  end
end
table.insert(out, 1, wait and tostring(wait) or '')
return out
