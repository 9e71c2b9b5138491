-- RUN_NOW: the dashboard's "run now": move still-scheduled payloads to the tail of their queues.
-- KEYS[1] prefix     P              the key space's root; derived from it: P:queue:<q>, P:wake:<q>
-- KEYS[2] scheduled  P:scheduled    payload -> due time
-- KEYS[3] queues     P:queues       known queue names
-- ARGV[1..] the payloads (exact text, as shown)
-- Reply: how many moved.
-- Invariants: a payload moves only if it is still scheduled (ZSCORE of that exact text), and to the queue it names;
--   one without a queue stays where it is. Removal and push are in one script: never in both places nor in none.
local prefix, scheduled, queues = KEYS[1], KEYS[2], KEYS[3]
local moved = 0
for i = 1, #ARGV do
  local raw = ARGV[i]
  local ok, doc = pcall(cjson.decode, raw)
  local q = ok and type(doc) == 'table' and doc['queue']
  if type(q) == 'string' and q ~= '' and redis.call('ZSCORE', scheduled, raw) then
    redis.call('ZREM', scheduled, raw)
    redis.call('RPUSH', prefix .. ':queue:' .. q, raw)
    redis.call('SADD', queues, q)
    wake(prefix, q)
    moved = moved + 1
  end
end
return moved
