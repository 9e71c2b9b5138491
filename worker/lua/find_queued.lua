-- FIND_QUEUED: a waiting job's payload, found by its id (worker/api.py's job view).
-- KEYS[1] queue  P:queue:<q>
-- KEYS[2] held   P:held:<name>: jobs of <name> held back by its concurrency limit, '<queue>\n<payload>'
-- ARGV[1] needle  '"id":"<id>"'
-- Reply: the first waiting payload holding the needle (in its queue, else held), or nil.
-- Invariants: read in chunks of 1000, stops at the first match. Writes nothing. The held list is read with pcall
--   (a wrong-typed one is not searched).
local queue, held, needle = KEYS[1], KEYS[2], ARGV[1]
local n = redis.call('LLEN', queue)
for i = 0, n - 1, 1000 do
  for _, raw in ipairs(redis.call('LRANGE', queue, i, i + 999)) do
    if string.find(raw, needle, 1, true) then return raw end
  end
end
n = redis.pcall('LLEN', held)
for i = 0, (type(n) == 'number' and n or 0) - 1, 1000 do
  for _, e in ipairs(redis.call('LRANGE', held, i, i + 999)) do
    if string.find(e, needle, 1, true) then return string.match(e, '^[^\n]*\n(.*)$') or e end
  end
end
return false
