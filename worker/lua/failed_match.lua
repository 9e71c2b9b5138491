-- FAILED_MATCH: the ids of every failed record matching the filters (`failed retry|remove --all --name/--type`).
-- KEYS[1] failed       P:failed        job id -> time of failure
-- KEYS[2] failed_data  P:failed:data   job id -> failure record (JSON)
-- ARGV[1] name  name filter ('' any)
-- ARGV[2] type  exception type filter ('' any)
-- Reply: the matching ids, newest first.
-- Invariants: junk records never match. Writes nothing.
local failed, failed_data = KEYS[1], KEYS[2]
local name, typ = ARGV[1], ARGV[2]
local ids = redis.call('ZREVRANGE', failed, 0, -1)
local out = {}
for _, id in ipairs(ids) do
  local raw = redis.call('HGET', failed_data, id)
  local ok, doc = false, nil
  if raw then ok, doc = decode_record(raw) end
  if ok and type(doc) == 'table' then
    local n = type(doc['name']) == 'string' and doc['name'] or ''
    local e = type(doc['type']) == 'string' and doc['type'] or ''
    if (name == '' or n == name) and (typ == '' or e == typ) then out[#out + 1] = id end
  end
end
return out
