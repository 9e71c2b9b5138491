-- SCHEDULE: periodic jobs (worker/schedule.py): claim the due tick of each schedule and enqueue its job, in one
-- atomic call, so any number of workers calling it for the same tick enqueue it once.
-- KEYS[1] paused     P:paused      paused queue names ('*': all)
-- KEYS[2] queues     P:queues      known queue names
-- KEYS[3] schedules  P:schedules   schedule name -> last written (ms), for status; the key space's root P is
--                                  derived from it (P = KEYS[3] without ':schedules'), and from P: P:sched:<name>,
--                                  P:queue:<q>, P:wake:<q>
-- ARGV[1] prefix     P, as the caller built KEYS: must match the one derived from KEYS[3] (else an error reply,
--                    nothing written). Not used to build keys.
-- then SCHEDULE_LEN (8) per schedule: name, queue, tick (ms: the latest tick at or before now, as the worker
--   computed it), next (the tick after), grace ms, ttl ms of P:sched:<name>, spec (for status), payload
-- Reply: {now, code per schedule}: enqueued | taken (claimed already) | late | paused | skew (the tick is not the
--   latest by Redis's clock: nothing written, the worker retries with its estimate corrected) | an error text.
-- Invariants: P:sched:<name> (HASH: tick = highest tick claimed, only ever raised; last = last tick enqueued;
--   skipped + reason = last tick not enqueued, 'late' = older than grace or 'paused'; next, spec, queue) is written,
--   and its expiry set to ttl, by the call that claims a tick; a check that finds it taken writes nothing.
--   P:schedules is pruned of names no worker has written for 30 days. A queue key of the wrong type is an error
--   text for that schedule, never a raise; a wake list of the wrong type is skipped.
local paused, queues, schedules = KEYS[1], KEYS[2], KEYS[3]
local prefix_arg = ARGV[1]
local SCHEDULES_AT, SCHEDULE_LEN = 2, 8
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
  local h = prefix .. ':sched:' .. name
  local code
  if tick > now or nxt <= now then
    code = 'skew'
  else
    local prev = tonumber(redis.call('HGET', h, 'tick') or '-1') or -1
    if tick <= prev then
      code = 'taken'
    elseif all_paused or redis.call('SISMEMBER', paused, q) == 1 then
      code = 'paused'
    elseif now - tick > grace then
      code = 'late'
    else
      local pushed = redis.pcall('RPUSH', prefix .. ':queue:' .. q, payload)
      if type(pushed) == 'number' then
        code = 'enqueued'
        redis.call('SADD', queues, q)
        wake(prefix, q)
        redis.call('HSET', h, 'tick', tick, 'last', tick)
      else
        code = 'cannot push to ' .. q .. ': ' .. tostring(pushed.err)
      end
    end
    if code == 'late' or code == 'paused' then redis.call('HSET', h, 'tick', tick, 'skipped', tick, 'reason', code) end
    if code ~= 'taken' then  -- whoever claims a tick writes what status shows
      redis.call('HSET', h, 'next', nxt, 'spec', spec, 'queue', q)
      redis.call('PEXPIRE', h, ttl)
      redis.call('ZADD', schedules, now, name)
      redis.call('ZREMRANGEBYSCORE', schedules, '-inf', now - 30 * 86400000)
    end
  end
  res[#res + 1] = code
end
return res
