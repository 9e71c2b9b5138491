"""The read model's Lua scripts (worker/api.py). Read-only except HOUSEKEEP, whose every write is a redis.pcall (a
wrong-typed key is named in its reply, never raised after a first write)."""

# KEYS: failed zset, failed data, processed counter, failed counter.  ARGV: prefix, failed_ttl_ms, batch, sample_ttl_s
# Trims failed records past FAILED_TTL (oldest first, at most `batch`) and stores this minute's counters as
# P:stat:minute:<unix minute> = "processed failed" (SET NX: the first caller of a minute wins). Every write is a
# redis.pcall: a wrong-typed key is reported in the reply, never raised after a first write.
HOUSEKEEP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cutoff = now - tonumber(ARGV[2])
local errs = {}
local old = redis.pcall('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. cutoff, 'LIMIT', 0, tonumber(ARGV[3]))
local trimmed = 0
if type(old) == 'table' and old.err == nil then
  for _, id in ipairs(old) do
    redis.pcall('HDEL', KEYS[2], id)
    redis.pcall('ZREM', KEYS[1], id)
    trimmed = trimmed + 1
  end
else
  errs[#errs + 1] = KEYS[1]
end
local p = redis.pcall('GET', KEYS[3])
local f = redis.pcall('GET', KEYS[4])
if type(p) == 'table' then errs[#errs + 1] = KEYS[3]; p = false end
if type(f) == 'table' then errs[#errs + 1] = KEYS[4]; f = false end
local minute = math.floor(now / 60000)
redis.pcall('SET', ARGV[1] .. ':stat:minute:' .. minute, (tonumber(p) or 0) .. ' ' .. (tonumber(f) or 0),
            'NX', 'EX', tonumber(ARGV[4]))
return {t[1], t[2], trimmed, table.concat(errs, ',')}
"""

# cjson refuses a lone surrogate escape (Python's json writes one for a surrogate-escaped file name): such a record
# is decoded again with those escapes replaced, only to read its name and type.
DECODE = """
local function decode(raw)
  local ok, doc = pcall(cjson.decode, raw)
  if not ok then ok, doc = pcall(cjson.decode, (string.gsub(raw, '\\\\u[dD][89abAB]%x%x', '?'))) end
  if not ok then ok, doc = pcall(cjson.decode, (string.gsub(raw, '\\\\u[dD][c-fC-F]%x%x', '?'))) end
  return ok, doc
end
"""

# KEYS: failed zset, failed data.  ARGV: name filter ('' any), type filter ('' any), offset, limit.
# Read-only: walks the registry newest first, decodes each record once, and returns
# {total, matched, skipped, names_json, types_json, record...} for the page [offset, offset+limit) of the matches.
# Junk records (non-JSON, not an object) are counted in `skipped` and never match a filter.
FAILED_PAGE = DECODE + """
local ids = redis.call('ZREVRANGE', KEYS[1], 0, -1)
local name, typ, offset, limit = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local matched, skipped, page = 0, 0, {}
local names, types = {}, {}
local skipped_ids = {}
local step = 500
for i = 1, #ids, step do
  local chunk = {}
  for j = i, math.min(i + step - 1, #ids) do chunk[#chunk + 1] = ids[j] end
  local raws = redis.call('HMGET', KEYS[2], unpack(chunk))
  for j, raw in ipairs(raws) do
    local ok, doc = false, nil
    if raw then ok, doc = decode(raw) end
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
"""

# KEYS: failed zset, failed data.  ARGV: name filter, type filter.  The ids of every matching record (read-only).
FAILED_MATCH = DECODE + """
local ids = redis.call('ZREVRANGE', KEYS[1], 0, -1)
local out = {}
for _, id in ipairs(ids) do
  local raw = redis.call('HGET', KEYS[2], id)
  local ok, doc = false, nil
  if raw then ok, doc = decode(raw) end
  if ok and type(doc) == 'table' then
    local n = type(doc['name']) == 'string' and doc['name'] or ''
    local e = type(doc['type']) == 'string' and doc['type'] or ''
    if (ARGV[1] == '' or n == ARGV[1]) and (ARGV[2] == '' or e == ARGV[2]) then out[#out + 1] = id end
  end
end
return out
"""

# KEYS: queue list.  ARGV: needle ('"id":"<id>"').  The first waiting payload holding the needle, read in chunks
# (read-only; stops at the first match).
FIND_QUEUED = """
local n = redis.call('LLEN', KEYS[1])
for i = 0, n - 1, 1000 do
  for _, raw in ipairs(redis.call('LRANGE', KEYS[1], i, i + 999)) do
    if string.find(raw, ARGV[1], 1, true) then return raw end
  end
end
return false
"""


# KEYS: none.  ARGV: prefix, '1' to add every known queue, queue names...  The number of jobs waiting for a worker:
# every served queue's depth plus the scheduled jobs already due (read-only; for autoscalers such as HireFire).
BACKLOG = """
local prefix, names, seen = ARGV[1], {}, {}
for i = 3, #ARGV do if not seen[ARGV[i]] then seen[ARGV[i]] = true; names[#names + 1] = ARGV[i] end end
if ARGV[2] == '1' then
  for _, q in ipairs(redis.call('SMEMBERS', prefix .. ':queues')) do
    if not seen[q] then seen[q] = true; names[#names + 1] = q end
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = redis.call('ZCOUNT', prefix .. ':scheduled', '-inf', now)
for _, q in ipairs(names) do n = n + redis.call('LLEN', prefix .. ':queue:' .. q) end
return n
"""
