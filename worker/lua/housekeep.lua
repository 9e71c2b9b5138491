-- HOUSEKEEP: the read model's upkeep (worker/api.py): trim failed records past FAILED_TTL, sample this minute's
-- counters.
-- KEYS[1] prefix        P                  the key space's root; derived from it: P:stat:minute:<unix minute>
-- KEYS[2] failed        P:failed           job id -> time of failure
-- KEYS[3] failed_data   P:failed:data      job id -> failure record
-- KEYS[4] processed     P:stat:processed   counter
-- KEYS[5] failed_count  P:stat:failed      counter
-- ARGV[1] failed_ttl    FAILED_TTL in ms
-- ARGV[2] batch         at most this many records trimmed (oldest first)
-- ARGV[3] sample_ttl_s  how long a minute's sample lives
-- Reply: {sec, usec, trimmed, wrong-typed keys joined by ','}.
-- Invariants: P:stat:minute:<m> = "processed failed" is SET NX (the first caller of a minute wins). Every write is
--   a redis.pcall: a wrong-typed key is reported in the reply, never raised after a first write.
local prefix, failed, failed_data, processed, failed_count = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local failed_ttl, batch, sample_ttl_s = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now, _, t = clock()
local cutoff = now - failed_ttl
local errs = {}
local old = redis.pcall('ZRANGEBYSCORE', failed, '-inf', '(' .. cutoff, 'LIMIT', 0, batch)
local trimmed = 0
if type(old) == 'table' and old.err == nil then
  for _, id in ipairs(old) do
    redis.pcall('HDEL', failed_data, id)
    redis.pcall('ZREM', failed, id)
    trimmed = trimmed + 1
  end
else
  errs[#errs + 1] = failed
end
local p = redis.pcall('GET', processed)
local f = redis.pcall('GET', failed_count)
if type(p) == 'table' then errs[#errs + 1] = processed; p = false end
if type(f) == 'table' then errs[#errs + 1] = failed_count; f = false end
local minute = math.floor(now / 60000)
redis.pcall('SET', prefix .. ':stat:minute:' .. minute, (tonumber(p) or 0) .. ' ' .. (tonumber(f) or 0),
            'NX', 'EX', sample_ttl_s)
return {t[1], t[2], trimmed, table.concat(errs, ',')}
