-- FIND_QUEUED: a waiting job's payload, found by its id (worker/api.py's job view).
-- KEYS[1] queue  P:queue:<q>
-- ARGV[1] needle  '"id":"<id>"'
-- Reply: the first waiting payload holding the needle, or nil.
-- Invariants: read in chunks of 1000, stops at the first match. Writes nothing.
local queue, needle = KEYS[1], ARGV[1]
local n = redis.call('LLEN', queue)
for i = 0, n - 1, 1000 do
  for _, raw in ipairs(redis.call('LRANGE', queue, i, i + 999)) do
    if string.find(raw, needle, 1, true) then return raw end
  end
end
return false
