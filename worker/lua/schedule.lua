-- SCHEDULE: periodic jobs (worker/schedule.py): claim the due tick of each schedule and enqueue its job, in one
-- atomic call, so any number of workers calling it for the same tick enqueue it once.
-- KEYS[1] paused     P:paused      paused queue names ('*': all)
-- KEYS[2] queues     P:queues      known queue names
-- KEYS[3] schedules  P:schedules   schedule name -> last written (ms), for status; the key space's root P is
--                                  derived from it (P = KEYS[3] without ':schedules'), and from P: P:sched:<name>,
--                                  P:queue:<q>, P:wake:<q>, P:job:<id> (the status record of each tick's run)
-- ARGV[1] prefix     P, as the caller built KEYS: must match the one derived from KEYS[3] (else an error reply,
--                    nothing written). Not used to build keys.
-- then SCHEDULE_LEN (10) per schedule: name, queue, tick (ms: the latest tick at or before now, as the worker
--   computed it), next (the tick after), grace ms, ttl ms of P:sched:<name>, spec (for status), payload, the
--   payload's job id, unique ('1': skip the tick while the previous tick's run has not ended; '' = @job(unique=False))
-- Reply: {now, code per schedule}: enqueued | taken (claimed already) | late | paused | 'overlap:<id>' (unique: the
--   previous run <id> is still queued, scheduled for a retry or running: this tick is skipped) | skew (the tick is
--   not the latest by Redis's clock: nothing written, the worker retries with its estimate corrected) | an error text.
-- Invariants: P:sched:<name> (HASH: tick = highest tick claimed, only ever raised; last = last tick enqueued;
--   run = the id of the last tick's run; skipped + reason = last tick not enqueued, 'late' = older than grace,
--   'paused' or 'overlap'; next, spec, queue) is written by the call that claims a tick; a check that finds it
--   taken writes nothing. Each run gets its status record P:job:<id> (status queued, name, queue, enqueued_at,
--   attempts) in the call that enqueues it, as enqueue.lua writes one: the claim writes none, so the record says
--   queued while the run runs, scheduled while it waits for a retry, queued again after a put-back or a recovery,
--   and done/failed/canceled (or is gone: RESULT_TTL 0) once it ended. That record alone decides an overlap: no
--   TTL does. Hence a unique schedule's P:sched:<name> has no expiry while its run has not ended (PERSIST: a
--   fleet-wide outage longer than the ttl must not forget a run that recovery will put back), and ttl once it has
--   (and always, for @job(unique=False)).
--   P:schedules is pruned of names no worker has written for 30 days. A queue key of the wrong type is an error
--   text for that schedule, never a raise; a wake list of the wrong type is skipped.
local paused, queues, schedules = KEYS[1], KEYS[2], KEYS[3]
local prefix_arg = ARGV[1]
local SCHEDULES_AT, SCHEDULE_LEN = 2, 10
local SUFFIX = ':schedules'
local prefix = string.sub(schedules, 1, #schedules - #SUFFIX)
if prefix .. SUFFIX ~= schedules or prefix ~= prefix_arg then
  return redis.error_reply('ERR schedule: the schedules key ' .. schedules .. ' is not ' .. prefix_arg .. SUFFIX)
end
local now = clock()
local all_paused = redis.call('SISMEMBER', paused, '*') == 1
local res = {now}
for i = SCHEDULES_AT, #ARGV, SCHEDULE_LEN do
  local name, q, tick, nxt = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local grace, ttl, spec, payload = tonumber(ARGV[i + 4]), ARGV[i + 5], ARGV[i + 6], ARGV[i + 7]
  local id, unique = ARGV[i + 8], ARGV[i + 9] == '1'
  local h = prefix .. ':sched:' .. name
  local code
  local pending = false  -- unique: the run P:sched:<name> names (this tick's or the previous one) has not ended
  local htype = redis.call('TYPE', h)['ok']  -- a record of the wrong type: this schedule's error, no raise
  if htype ~= 'hash' and htype ~= 'none' then
    code = 'WRONGTYPE ' .. h .. ' is a ' .. htype .. ', expected a hash'
  elseif tick > now or nxt <= now then
    code = 'skew'
  else
    local prev = tonumber(redis.call('HGET', h, 'tick') or '-1') or -1
    if prev ~= prev or prev == math.huge then prev = -1 end  -- nan, inf: no tick was ever that (another program's)
    if tick <= prev then
      code = 'taken'
    elseif all_paused or redis.call('SISMEMBER', paused, q) == 1 then
      code = 'paused'
    elseif now - tick > grace then
      code = 'late'
    end
    local run = unique and code ~= 'taken' and redis.pcall('HGET', h, 'run')  -- the previous tick's run
    if type(run) == 'string' and run ~= '' then
      local was = redis.pcall('HGET', prefix .. ':job:' .. run, 'status')
      pending = was == 'queued' or was == 'scheduled'
      if not code and pending then code = 'overlap:' .. run end
    end
    if not code then
      local pushed = redis.pcall('RPUSH', prefix .. ':queue:' .. q, payload)
      if type(pushed) == 'number' then
        code, pending = 'enqueued', unique
        jset(prefix, id, 'status', 'queued', 'name', name, 'queue', q, 'enqueued_at', tick, 'attempts', 0)
        redis.pcall('SADD', queues, q)  -- (pcall: the job is queued; nothing may raise now)
        wake(prefix, q)
        redis.call('HSET', h, 'tick', tick, 'last', tick, 'run', id)
      else
        code = 'cannot push to ' .. q .. ': ' .. tostring(pushed.err)
      end
    end
    if code == 'late' or code == 'paused' or string.sub(code, 1, 8) == 'overlap:' then
      redis.call('HSET', h, 'tick', tick, 'skipped', tick, 'reason', string.match(code, '^%a+'))
    end
    if code ~= 'taken' then  -- whoever claims a tick writes what status shows
      redis.call('HSET', h, 'next', nxt, 'spec', spec, 'queue', q)
      if pending then redis.call('PERSIST', h) else redis.call('PEXPIRE', h, ttl) end
      redis.pcall('ZADD', schedules, now, name)
      redis.pcall('ZREMRANGEBYSCORE', schedules, '-inf', now - 30 * 86400000)
    end
  end
  res[#res + 1] = code
end
return res
