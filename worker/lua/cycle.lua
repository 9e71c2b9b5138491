-- CYCLE: one call per turn of the supervisor's loop: record the outcomes of finished jobs, refresh the heartbeat
-- (when due), move due scheduled jobs (when asked: tidy), and claim up to one job for each free slot. The hot path
-- (a job's outcome plus the next claim) is this one call.
-- KEYS[1] prefix      P                 the key space's root; derived from it: P:queue:<q>, P:wake:<q>,
--                                       P:job:<id>, P:done:<id>, P:failed, P:failed:data, P:stat:processed,
--                                       P:stat:failed, P:cancel:<w> (popped when beating), P:unique:<key>
--                                       (unique_until="start": freed by the claim, taken back by a put-back/retry)
--                                       P:stat:failed, P:cancel:<w> (popped when beating); limited jobs (issue
--                                       25): P:running:<name>, P:held:<name>, P:rate:<name>, P:queues
--                                       P:stat:failed, P:cancel:<w> (popped when beating), and for a group's
--                                       member or callback: P:group:<gid>, P:group_res:<gid>, P:group_ids:<gid>
-- KEYS[2] processing  P:processing:<w>  this worker's claimed jobs
-- KEYS[3] workers     P:workers         worker name -> deadline (ms)
-- KEYS[4] worker      P:worker:<w>      this worker's hash (job:/started:/queue:/ckpt:<slot>, state, seen)
-- KEYS[5] scheduled   P:scheduled       retries and delayed jobs (payload -> due ms)
-- KEYS[6] paused      P:paused          paused queue names ('*': all)
-- KEYS[7] queues      P:queues          known queue names
-- KEYS[8] epoch       P:epoch           Redis's data generation
-- KEYS[9] recovered   P:recovered:<w>   read when beating: another worker took this one for dead
-- ARGV[1] worker_name  <w>
-- ARGV[2] beat_ttl     the worker's HEARTBEAT_TTL in ms; '' = no beat this call
-- ARGV[3] failed_max   FAILED_MAX
-- ARGV[4] failed_ttl   FAILED_TTL in ms
-- ARGV[5] wildcard     '1': claim from every known queue, in name order (QUEUES=*)
-- ARGV[6] mode         '' = derive idle/busy/paused; else the state to show (e.g. 'stopping')
-- ARGV[7] busy         slots still running after this call, not counting new claims
-- ARGV[8] tidy         '1': move due scheduled jobs, and ring the wake list of a queue this call left work in
-- ARGV[9] epoch        P:epoch as the worker registered it ('' = not checked)
-- ARGV[10] nq          then (from QUEUES_AT) nq queue names in priority order
--   then nlim (at lim_count_at), then nlim limits of LIMIT_LEN (4) fields each (issue 25; nlim = 0 when this
--     worker serves no limited job, and then nothing below costs anything): job name, concurrency ('' = none),
--     rate count and rate period in ms ('' '' = none)
--   then nck (at ckpt_count_at), then nck pairs (slot, checkpoint JSON): running jobs' latest checkpoints, kept in
--     the worker hash (ckpt:<slot>) so that recovery of a dyno killed outright puts them back with their progress;
--     '' clears the slot's (its job ended)
--   then nout (at outcome_count_at), then nout outcomes of OUTCOME_LEN (8) fields each:
--     op, slot, payload, job id ('' = keep no status), a, b, c, started (ms, Redis clock: when it was claimed, as
--     this script returned it; '' = read started:<slot>)
--       ack:     a = result JSON ('' = none), b = ms to keep the status record ('0' = delete it now),
--                c = a warning for the status record ('' = none; a result that was not JSON)
--       fail:    a = failure record, b = ms to keep the status record, c = attempts
--       retry:   a = new payload, b = delay ms, c = attempts
--       cancel:  b = ms to keep the status record ('0' = delete it now): stopped by cancel(running=True)
--       requeue: a = queue, b = the payload to put back ('' = unchanged; else it carries the checkpoint),
--                c = attempts for the status record ('' = unchanged: an interruption; else a run lost, issue 27)
--       retry of a job whose id is in P:cancel:<w> (cancel(running=True) asked before a beat read it): not
--         scheduled; it ends canceled, its record kept FAILED_TTL (adversarial review of issue 24)
--   then (from slots_at to the end) the slot numbers to claim into (one claim per slot, as far as the queues go)
-- Reply: {held (LLEN of the processing list; -1 when not beating), ms until the next scheduled job is due ('' if
--   none; only when nothing was claimed), now (ms), nclaims, recovered (when beating: 1 if P:recovered:<w> exists,
--   2 if only this worker's P:workers entry was gone, else 0), odd keys ('' or key names joined by newlines),
--   cancel (when beating: the ids popped from P:cancel:<w>, joined by newlines; else ''), slot1, payload1,
--   queue1, ..., then the queue names considered (only when nothing was claimed)};
--   {-2}: Redis lost its data since the worker registered (P:epoch differs), nothing written;
--   {-3, key, type}: a key this call must write is of the wrong type, nothing written.
-- Invariants:
-- * A claimed job moves from its queue to the processing list by LMOVE here; it leaves that list only here, with
--   its outcome, and only if it is still there (a repeated call, or a job another worker recovered, records
--   nothing twice).
-- * The epoch is checked before the first write. The check is skipped only when the first outcome's job was still
--   in the processing list (LREM, which writes nothing when it finds nothing, runs first): data lost since the
--   claim would have taken the list with it.
-- * Wrong-typed keys (issue 27 item 1): the processing list, and P:scheduled, P:failed, P:failed:data when an
--   outcome of this call writes them, are TYPE-checked before the LREM ({-3, key, type}). Every other key is
--   written or read with pcall; those found wrong-typed are skipped and named in the reply (odd keys).
-- * Status records (P:job:<id>) follow each outcome: done/failed/scheduled/queued (a running job is found in its
--   worker's hash, job:<slot>: no write per claim). A job whose record had an expiry before its outcome (a
--   waiter's mark, await.lua; PEXPIRE NX tells, at no extra command) also has its final record pushed to
--   P:done:<id> (notify: Job.wait). The worker hash records per claim the queue it
--   came from (queue:<slot>): recovery puts the job back there, whatever its payload says (issue 27 item 6).
-- * unique_until="start" (issue 25): the claim of a job whose id is us:<key>:<random> (its payload starts
--   '{"id":"us:') deletes P:unique:us:<key> if it names that job; a put-back or retry of one takes it back if no
--   other waiting job holds it (prelude: unique_free, unique_retake). Other jobs pay one string compare per claim.
-- * Limits (issue 25), for the job names in the limits section only. Concurrency: P:running:<name> maps
--   '<slot>:<worker>' -> job id for each run; a claimed job whose name is at its limit (after dropping entries of
--   workers gone from P:workers and of this worker's free slots) moves from the processing list to
--   P:held:<name> ('<queue>\n<payload>') and the claim goes on; every recorded outcome of such a job deletes its
--   entry and moves held jobs (as many as the limit has room for) back to the head of their queues. Rate: GCRA on
--   Redis's clock in P:rate:<name> (tat; a bucket of <count> tokens): a job over the rate reserves the next token
--   (tok:<id> = its time) and is parked in P:scheduled until then; claimed again, its reservation lets it run.
--   At most HOLD_MAX jobs are held per call (then the queue's wake list is rung). A limit key of the wrong type
--   is named (odd keys) and moves the job to the tail of its queue, so the rest of it flows (adversarial review of
--   issue 25); met again in the same call, it goes back to the head and ends this call's claims from that queue.
-- * Groups (issue 25 item 4): a member's end (done, failed, canceled) is recorded in its group in this same call,
--   once (group_end: HSETNX of its id), and the call that records a group's last member queues the group's
--   callback; a callback's end sets the expiry of its group's keys (group_close). Other jobs pay one string.byte.
-- * Cost: this runs once per job: few tables, no number formatting (the clock is kept as a string for writes),
--   and no GET of the epoch on the hot path (see above).
local prefix, processing, workers, worker_hash = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local scheduled, paused, known, epoch_key, recovered_key = KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local worker_name, beat_ttl, failed_max, failed_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local wildcard, mode, busy, tidy, epoch = ARGV[5] == '1', ARGV[6], ARGV[7], ARGV[8] == '1', ARGV[9]
local beating = beat_ttl ~= ''
local cancel_key = prefix .. ':cancel:' .. worker_name  -- cancel(running=True): ids to stop (SPOP at beats)
local nq = tonumber(ARGV[10])
local QUEUES_AT = 11                                                       -- the nq queue names
local lim_count_at = QUEUES_AT + nq                                        -- nlim, then the limits
local LIMIT_LEN = 4
local ckpt_count_at = lim_count_at + 1 + LIMIT_LEN * tonumber(ARGV[lim_count_at])  -- nck, then its pairs
local outcome_count_at = ckpt_count_at + 1 + 2 * tonumber(ARGV[ckpt_count_at])  -- nout, then the outcomes
local nout = tonumber(ARGV[outcome_count_at])
local OUTCOME_LEN = 8
local outcomes_at = outcome_count_at + 1
local slots_at = outcomes_at + OUTCOME_LEN * nout                          -- the slots to claim into
local now, now_s = clock()
local got = wrong_type(processing, 'list')  -- types first: nothing is written yet (see above)
if got then return {-3, processing, got} end
for at = outcomes_at, slots_at - 1, OUTCOME_LEN do
  local op = ARGV[at]
  if op == 'retry' then
    got = wrong_type(scheduled, 'zset')
    if got then return {-3, scheduled, got} end
  elseif op == 'fail' then
    got = wrong_type(prefix .. ':failed', 'zset')
    if got then return {-3, prefix .. ':failed', got} end
    got = wrong_type(prefix .. ':failed:data', 'hash')
    if got then return {-3, prefix .. ':failed:data', got} end
  end
end
local first = nout > 0 and redis.call('LREM', processing, -1, ARGV[outcomes_at + 2]) or 0
if epoch ~= '' and first ~= 1 then  -- no write yet
  local e = redis.pcall('GET', epoch_key)
  if type(e) == 'table' then return {-3, epoch_key, redis.call('TYPE', epoch_key)['ok']} end
  if e ~= epoch then return {-2} end
end
local odd = nil  -- keys found wrong-typed (and skipped), for the reply
local lim, limit_of, limit_free = nil, nil, nil  -- limits (see the invariants): only when some are configured
if ckpt_count_at > lim_count_at + 1 then
  lim = {}
  for at = lim_count_at + 1, ckpt_count_at - 1, LIMIT_LEN do
    lim[ARGV[at]] = {conc = tonumber(ARGV[at + 1]), n = tonumber(ARGV[at + 2]), ms = tonumber(ARGV[at + 3])}
  end
  limit_of = function(p)  -- a payload's job name and its limits (nil if none): read without cjson when ours
    local name = string.match(p, '^{"id":"[^"]*","name":"([^"\\]*)"')
    if not name then
      local ok, doc = pcall(cjson.decode, p)
      if ok and type(doc) == 'table' and type(doc['name']) == 'string' then name = doc['name'] end
    end
    if name and lim[name] then return name, lim[name] end
    return nil, nil
  end
  limit_free = function(p, slot, id)  -- a limited job's outcome is recorded: its run no longer counts
    local name, L = limit_of(p)
    if not (L and L.conc) then return end
    local rk = prefix .. ':running:' .. name
    local all = (slot == '-1' or slot == '') and redis.pcall('HGETALL', rk) or {}
    for i = 1, (all.err and 0 or #all), 2 do  -- a claim adopted after a lost reply: no slot, found by id
      if all[i + 1] == id and string.sub(all[i], -#worker_name - 1) == ':' .. worker_name then
        redis.pcall('HDEL', rk, all[i])
      end
    end
    local n = redis.pcall('HDEL', rk, slot .. ':' .. worker_name)
    if type(n) == 'number' then n = redis.pcall('HLEN', rk) end
    if type(n) ~= 'number' then odd = add_line(odd, rk); return end
    if n < L.conc then odd = release_held(prefix, name, math.min(L.conc - n, 10), odd) end
  end
end
-- The first LREM above may already have written: from here on, a bookkeeping key of the wrong type must not make
-- the script raise before the outcomes are recorded (pcall), or the job would be in no list at all.
local readded = false
if beating then
  readded = redis.pcall('ZADD', workers, now + tonumber(beat_ttl), worker_name)
  if type(readded) == 'table' then odd = workers end
  readded = readded == 1
end
for at = ckpt_count_at + 1, outcome_count_at - 1, 2 do
  if ARGV[at + 1] == '' then
    redis.pcall('HDEL', worker_hash, 'ckpt:' .. ARGV[at])
  else
    redis.pcall('HSET', worker_hash, 'ckpt:' .. ARGV[at], ARGV[at + 1])
  end
end
for at = outcomes_at, slots_at - 1, OUTCOME_LEN do
  local op, slot, payload, id = ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  -- The outcome takes effect only if the job is still ours: a call repeated after a lost reply, or a job already
  -- recovered by another worker, records nothing twice.
  local removed = first
  if at > outcomes_at then removed = redis.call('LREM', processing, -1, payload) end
  if removed == 1 then
    if lim then limit_free(payload, slot, id) end
    local a, b, c, started = ARGV[at + 4], ARGV[at + 5], ARGV[at + 6], ARGV[at + 7]
    local jk = prefix .. ':job:' .. id
    if started == '' and id ~= '' and (op == 'ack' or op == 'fail' or op == 'cancel') then
      started = redis.pcall('HGET', worker_hash, 'started:' .. slot)
      if type(started) ~= 'string' then started = now_s end
    end
    -- status records are written with pcall: a key of the wrong type never aborts the script
    if op == 'ack' then
      if type(redis.pcall('INCR', prefix .. ':stat:processed')) == 'table' then
        odd = add_line(odd, prefix .. ':stat:processed')
      end
      if id ~= '' then
        if b ~= '0' then
          redis.pcall('HSET', jk, 'status', 'done', 'ended_at', now_s, 'result', a, 'worker', worker_name,
                      'started_at', started)
          if c ~= '' then redis.pcall('HSET', jk, 'warning', c) end
          if redis.pcall('PEXPIRE', jk, b, 'NX') == 0 then  -- it had an expiry: a waiter's mark (await.lua)
            redis.pcall('PEXPIRE', jk, b)
            notify(prefix, id, 'done', a)
          end
        else
          if redis.call('PTTL', jk) > 0 then notify(prefix, id, 'done', a) end
          redis.call('DEL', jk)
        end
      end
    elseif op == 'fail' then
      record_failure(prefix, now, id, a, tonumber(failed_max), tonumber(failed_ttl))
      if id ~= '' then
        redis.pcall('HSET', jk, 'status', 'failed', 'ended_at', now_s, 'attempts', c, 'worker', worker_name,
                    'started_at', started)
        if redis.pcall('PEXPIRE', jk, b, 'NX') == 0 then  -- a waiter's mark (see ack)
          redis.pcall('PEXPIRE', jk, b)
          notify(prefix, id, 'failed', a)
        end
      end
    elseif op == 'cancel' then
      if id ~= '' then
        if redis.call('PTTL', jk) > 0 then notify(prefix, id, 'canceled', '') end
        redis.pcall('HSET', jk, 'status', 'canceled', 'ended_at', now_s, 'worker', worker_name, 'started_at', started)
        if b ~= '0' then redis.pcall('PEXPIRE', jk, b) else redis.pcall('DEL', jk) end
      end
    elseif op == 'retry' and id ~= '' and redis.pcall('SREM', cancel_key, id) == 1 then
      -- cancel(running=True) asked to stop it before a beat read the request: it is not run again
      op, b = 'cancel', failed_ttl  -- (for its group, below: its record is kept FAILED_TTL)
      if redis.call('PTTL', jk) > 0 then notify(prefix, id, 'canceled', '') end
      redis.pcall('HSET', jk, 'status', 'canceled', 'ended_at', now_s, 'worker', worker_name)
      redis.pcall('PEXPIRE', jk, failed_ttl)
    elseif op == 'retry' then
      redis.call('ZADD', scheduled, now + tonumber(b), a)
      if id ~= '' then redis.pcall('HSET', jk, 'status', 'scheduled', 'attempts', c) end
      if string.sub(id, 1, 3) == 'us:' then unique_retake(prefix, id) end
    elseif op == 'requeue' then
      local back = (b ~= '') and b or payload
      local pushed = redis.pcall('LPUSH', prefix .. ':queue:' .. a, back)
      if type(pushed) == 'number' then
        wake(prefix, a)
        if type(redis.pcall('SADD', known, a)) == 'table' then  -- a QUEUES=* worker finds it (P:queues may be
          odd = add_line(odd, known)                              -- gone with lost data)
        end
      else  -- its queue is not a list: the claim stays (processing: TYPE-checked above)
        redis.call('RPUSH', processing, payload)
        odd = add_line(odd, prefix .. ':queue:' .. a)
      end
      if id ~= '' and c ~= '' then redis.pcall('HSET', jk, 'status', 'queued', 'attempts', c)
      elseif id ~= '' then redis.pcall('HSET', jk, 'status', 'queued') end
      if string.sub(id, 1, 3) == 'us:' and type(pushed) == 'number' then unique_retake(prefix, id) end
    end
    -- a group's member or callback (issue 25 item 4) that ended: its payload's head goes on ',"g' after the id
    -- (group_of), any other job's on ',"name"': one string.byte for those (103: 'g')
    if id ~= '' and string.byte(payload, 11 + #id) == 103 and (op == 'ack' or op == 'fail' or op == 'cancel') then
      local kind, gid = group_of(payload, id)
      if gid and kind == 'group' then
        local bad = group_end(prefix, gid, id, (op == 'ack' and 'done') or (op == 'fail' and 'failed') or 'canceled',
                              op == 'cancel' and '' or a, now_s)
        if bad then odd = add_line(odd, bad) end
      elseif gid then
        group_close(prefix, gid, b)  -- its callback ended: the group's keys go with its status record
      end
    end
  end
end
local due = tidy and redis.pcall('ZRANGEBYSCORE', scheduled, '-inf', now, 'LIMIT', 0, 100) or {}
if due.err then due, odd = {}, add_line(odd, scheduled) end
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
      wake(prefix, q)
      local id = string.match(p, '^{"id":"([%w_%.:%-]+)"')
      if id then redis.pcall('HSET', prefix .. ':job:' .. id, 'status', 'queued') end
    end
  end
end
local queues = wildcard and redis.pcall('SORT', known, 'ALPHA') or nil  -- else ARGV[QUEUES_AT ..]
if queues and queues.err then queues, odd = {}, add_line(odd, known) end
local nqs = queues and #queues or nq
local res, wf = {0, '', now, 0, 0, '', ''}, {}  -- wf: the worker hash's fields, written once at the end
local claimed, anyopen, left = 0, false, nil  -- left: queues we took from (only when tidying)
local next_slot = slots_at  -- ARGV[next_slot]: the slot the next claim goes into
local held, HOLD_MAX, admit = 0, 100, nil  -- jobs this call held back by their limits (at most HOLD_MAX)
local aside = nil  -- payloads this call moved to their queue's tail (a limit key of the wrong type), and those keys
if lim then
  aside = {}
  local prune = function(rk)  -- entries of workers gone from P:workers and of our own free slots: how many went
    local all, gone = redis.pcall('HGETALL', rk), 0
    for i = 1, (all.err and 0 or #all), 2 do
      local s, w = string.match(all[i], '^(%-?%d+):(.*)$')
      local stale = not w
      if w == worker_name then
        for c = next_slot, #ARGV do if ARGV[c] == s then stale = true end end
      elseif w then
        stale = redis.pcall('ZSCORE', workers, w) == false
      end
      if stale and redis.pcall('HDEL', rk, all[i]) == 1 then gone = gone + 1 end
    end
    return gone
  end
  -- a job just moved (LMOVE) to the tail of the processing list from queue q, to run in slot: 'run', 'held'
  -- (moved on to P:held:<name> or parked in P:scheduled), 'aside' (a limit key of the wrong type: it went to the
  -- tail of q, the claim goes on) or nil (the same again in this call: back to the head of q, q is done for now)
  admit = function(v, q, slot)
    local name, L = limit_of(v)
    if not L then return 'run' end
    local id = string.match(v, '^{"id":"([%w_%.:%-]+)"') or redis.sha1hex(v)
    local rk, bad = prefix .. ':running:' .. name, nil
    if L.conc then
      local n = redis.pcall('HLEN', rk)
      if type(n) ~= 'number' then bad = rk
      elseif n >= L.conc and n - prune(rk) >= L.conc then
        local hk = prefix .. ':held:' .. name
        if type(redis.pcall('RPUSH', hk, q .. '\n' .. v)) == 'number' then
          redis.call('RPOP', processing)
          held = held + 1
          return 'held'
        end
        bad = hk
      end
    end
    if not bad and L.n then
      local bk = prefix .. ':rate:' .. name
      local mine = redis.pcall('HDEL', bk, 'tok:' .. id)  -- a token it reserved when it was parked
      if type(mine) ~= 'number' then bad = bk
      elseif mine == 0 then
        local T = L.ms / L.n
        local tat = tonumber(redis.call('HGET', bk, 'tat')) or now
        if not (tat >= now and tat < now + 31536000000) then tat = now end  -- (also nan, inf: another program's)
        local at = tat - (L.n - 1) * T  -- when this job conforms (GCRA: a bucket of L.n tokens)
        if at > now and type(redis.pcall('ZADD', scheduled, at, v)) ~= 'number' then bad = scheduled
        else
          redis.call('HSET', bk, 'tat', tat + T)
          redis.call('PEXPIRE', bk, math.ceil(tat + T - now) + L.ms + 60000)
          if at > now then  -- over the rate: parked until its token, which it keeps
            redis.call('HSET', bk, 'tok:' .. id, at)
            redis.call('RPOP', processing)
            held = held + 1
            return 'held'
          end
        end
      end
    end
    if bad then  -- it steps aside to the tail, so the rest of q flows; met again in this call: back to the head
      redis.call('RPOP', processing)
      if not aside[bad] then odd, aside[bad] = add_line(odd, bad), true end  -- (named once)
      if aside[v] then redis.pcall('LPUSH', prefix .. ':queue:' .. q, v); return nil end
      aside[v], held = true, held + 1
      redis.pcall('RPUSH', prefix .. ':queue:' .. q, v)
      return 'aside'
    end
    if L.conc then redis.pcall('HSET', rk, slot .. ':' .. worker_name, id) end
    return 'run'
  end
end
if next_slot <= #ARGV and nqs > 0 then  -- one look at the pause set: '*' (all) and each queue
  local p
  if queues then p = redis.pcall('SMISMEMBER', paused, '*', unpack(queues))
  else p = redis.pcall('SMISMEMBER', paused, '*', unpack(ARGV, QUEUES_AT, QUEUES_AT + nq - 1)) end
  if p.err then p, odd = {1}, add_line(odd, paused) end  -- unreadable: claim nothing
  local i = 1
  while p[1] == 0 and i <= nqs and next_slot <= #ARGV do
    local q = queues and queues[i] or ARGV[QUEUES_AT + i - 1]
    local v = false
    if p[i + 1] == 0 then
      anyopen = true
      v = redis.pcall('LMOVE', prefix .. ':queue:' .. q, processing, 'LEFT', 'RIGHT')
      if type(v) == 'table' then v, odd = false, add_line(odd, prefix .. ':queue:' .. q) end
    end
    local verdict = 'run'
    if v and admit then verdict = admit(v, q, ARGV[next_slot]) end
    if v and verdict ~= 'run' then  -- held back by a limit, or stepped aside (its key unusable: see admit)
      if not verdict or (verdict == 'aside' and held >= HOLD_MAX) then i = i + 1
      elseif held >= HOLD_MAX then  -- enough for one call: the next call (ours, or an idle worker's) goes on
        wake(prefix, q)
        i = nqs + 1
      end
    elseif v then
      -- (the job's status record is not touched here: get_job finds a running job in its worker's slots)
      if string.sub(v, 1, 10) == '{"id":"us:' then unique_free(prefix, string.match(v, '^{"id":"([^"]+)"')) end
      local slot = ARGV[next_slot]
      wf[#wf + 1], wf[#wf + 2], wf[#wf + 3], wf[#wf + 4] = 'job:' .. slot, v, 'started:' .. slot, now_s
      wf[#wf + 1], wf[#wf + 2] = 'queue:' .. slot, q  -- where recovery puts it back
      res[#res + 1], res[#res + 2], res[#res + 3] = slot, v, q
      claimed, next_slot = claimed + 1, next_slot + 1
      if tidy then left = left or {}; left[q] = true end
    else
      if left then left[q] = nil end
      i = i + 1
    end
  end
end
if left then  -- we took work and left some behind: ring for the next idle worker (when tidying)
  for q in pairs(left) do
    if redis.call('LLEN', prefix .. ':queue:' .. q) > 0 then wake(prefix, q) end
  end
end
local state = mode
if state == '' then
  if claimed > 0 or busy ~= '0' then state = 'busy'
  elseif nqs > 0 and not anyopen and next_slot <= #ARGV then state = 'paused'
  else state = 'idle' end
end
wf[#wf + 1], wf[#wf + 2] = 'state', state
if beating then wf[#wf + 1], wf[#wf + 2] = 'seen', now_s end
local freed = nil  -- slots whose job ended: their job:/started: fields go, unless this call claimed into them
for at = outcomes_at + 1, slots_at - 1, OUTCOME_LEN do  -- (outcome field 2: its slot)
  local slot, again = ARGV[at], false
  for c = slots_at, next_slot - 1 do
    if ARGV[c] == slot then again = true end
  end
  if not again then
    freed = freed or {}
    freed[#freed + 1], freed[#freed + 2], freed[#freed + 3] = 'job:' .. slot, 'started:' .. slot, 'queue:' .. slot
  end
end
if freed then redis.pcall('HDEL', worker_hash, unpack(freed)) end
if type(redis.pcall('HSET', worker_hash, unpack(wf))) == 'table' then odd = add_line(odd, worker_hash) end
res[1], res[4] = beating and redis.call('LLEN', processing) or -1, claimed  -- held: counted with beats
if beating then  -- taken for dead: our jobs were recovered (1), or at least our registration is gone (2)
  res[5] = (redis.call('EXISTS', recovered_key) == 1) and 1 or (readded and 2 or 0)
  local stop = redis.pcall('SPOP', cancel_key, 100)  -- cancel(running=True)
  if type(stop) == 'table' and stop[1] then res[7] = table.concat(stop, '\n') end
end
if claimed == 0 then
  local nxt = redis.pcall('ZRANGE', scheduled, 0, 0, 'WITHSCORES')
  res[2] = nxt[2] and tostring(math.max(0, tonumber(nxt[2]) - now)) or ''  -- ms from now, on Redis's clock
  if nxt.err and not tidy then odd = add_line(odd, scheduled) end
  for i = 1, nqs do res[#res + 1] = queues and queues[i] or ARGV[QUEUES_AT + i - 1] end
end
res[6] = odd or ''
return res
