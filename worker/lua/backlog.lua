-- BACKLOG: the number of jobs waiting for a worker, for autoscalers such as HireFire (worker/api.py).
-- KEYS[1] prefix  P   the key space's root; derived from it: P:queues, P:scheduled, P:queue:<q>
-- ARGV[1] all     '1': add every known queue (P:queues)
-- ARGV[2..] queue names
-- Reply: every served queue's depth plus the scheduled jobs already due (Redis clock).
-- Invariants: each queue counted once. Writes nothing.
local prefix = KEYS[1]
local all = ARGV[1]
local NAMES_AT = 2
local names, seen = {}, {}
for i = NAMES_AT, #ARGV do if not seen[ARGV[i]] then seen[ARGV[i]] = true; names[#names + 1] = ARGV[i] end end
if all == '1' then
  for _, q in ipairs(redis.call('SMEMBERS', prefix .. ':queues')) do
    if not seen[q] then seen[q] = true; names[#names + 1] = q end
  end
end
local now = clock()
local n = redis.call('ZCOUNT', prefix .. ':scheduled', '-inf', now)
for _, q in ipairs(names) do n = n + redis.call('LLEN', prefix .. ':queue:' .. q) end
return n
