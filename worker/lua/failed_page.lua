-- FAILED_PAGE: one page of the failed registry, filtered server-side (worker/api.py). Read-only.
-- KEYS[1] failed       P:failed        job id -> time of failure
-- KEYS[2] failed_data  P:failed:data   job id -> failure record (JSON)
-- ARGV[1] name    name filter ('' any)
-- ARGV[2] type    exception type filter ('' any)
-- ARGV[3] offset  of the page, in matches
-- ARGV[4] limit   page size
-- Reply: {total, matched, skipped, names_json, types_json, skipped_ids_json, record...}: the records of the page
--   [offset, offset+limit) of the matches, newest first.
-- Invariants: each record is decoded once; junk records (non-JSON, not an object) are counted in `skipped` (the
--   first 20 ids named) and never match a filter. Writes nothing.
local failed, failed_data = KEYS[1], KEYS[2]
local name, typ, offset, limit = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local ids = redis.call('ZREVRANGE', failed, 0, -1)
local matched, skipped, page = 0, 0, {}
local names, types = {}, {}
local skipped_ids = {}
local step = 500
for i = 1, #ids, step do
  local chunk = {}
  for j = i, math.min(i + step - 1, #ids) do chunk[#chunk + 1] = ids[j] end
  local raws = redis.call('HMGET', failed_data, unpack(chunk))
  for j, raw in ipairs(raws) do
    local ok, doc = false, nil
    if raw then ok, doc = decode_record(raw) end
    if not ok or type(doc) ~= 'table' then
      skipped = skipped + 1
      if #skipped_ids < 20 then skipped_ids[#skipped_ids + 1] = chunk[j] end
    else
      local n = type(doc['name']) == 'string' and doc['name'] or ''
      local e = type(doc['type']) == 'string' and doc['type'] or ''
      names[n] = (names[n] or 0) + 1
      types[e] = (types[e] or 0) + 1
      if (name == '' or n == name) and (typ == '' or e == typ) then
        if matched >= offset and matched < offset + limit then page[#page + 1] = raw end
        matched = matched + 1
      end
    end
  end
end
local out = {#ids, matched, skipped, cjson.encode(names), cjson.encode(types), cjson.encode(skipped_ids)}
for _, raw in ipairs(page) do out[#out + 1] = raw end
return out
