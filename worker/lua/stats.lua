-- STATS: every queue's depth and head in one read (worker/metrics.py), and, for the sampler, the claim of this
-- metrics interval (one worker per interval logs the l2met line).
-- KEYS[1] prefix  P   the key space's root; derived from it: P:metrics:<index> (the interval's claim), P:queues,
--                     P:queue:<q>
-- ARGV[1] interval_ms  '0' = read only, no claim
-- ARGV[2] worker_name  who claims the interval
-- ARGV[3] all          '1': add every known queue (P:queues)
-- ARGV[4..] queue names
-- Reply: {sec, usec, won (1), name, depth, head, ...} (sorted by name; head: false when empty) or {sec, usec, 0}
--   when another worker has this interval.
-- Invariants: the interval is claimed on the Redis clock (SET NX, expiring after two intervals), so every worker
--   agrees on its number whatever its own clock says. Its only write is that claim, before any read.
local prefix = KEYS[1]
local interval, worker_name, all = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local NAMES_AT = 4
local now, _, t = clock()
if interval > 0 then
  local key = prefix .. ':metrics:' .. math.floor(now / interval)
  if not redis.call('SET', key, worker_name, 'NX', 'PX', 2 * interval) then
    return {t[1], t[2], 0}
  end
end
local names, seen = {}, {}
local function add(q)
  if not seen[q] then seen[q] = true; names[#names + 1] = q end
end
for i = NAMES_AT, #ARGV do add(ARGV[i]) end
if all == '1' then
  for _, q in ipairs(redis.call('SMEMBERS', prefix .. ':queues')) do add(q) end
end
table.sort(names)
local out = {t[1], t[2], 1}
for _, q in ipairs(names) do
  local key = prefix .. ':queue:' .. q
  out[#out + 1] = q
  out[#out + 1] = redis.call('LLEN', key)
  out[#out + 1] = redis.call('LINDEX', key, 0)  -- false (nil) when empty
end
return out
