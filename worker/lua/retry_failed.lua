-- RETRY_FAILED: put failed jobs back on their queues (worker/failed.py: `failed retry`, the dashboard).
-- KEYS[1] prefix       P               the key space's root; derived from it: P:queue:<q>, P:wake:<q>, P:job:<id>,
--                                      P:unique:<key> (unique_until="start": taken back if free)
-- KEYS[2] failed       P:failed        job id -> time of failure
-- KEYS[3] failed_data  P:failed:data   job id -> failure record (JSON)
-- KEYS[4] queues       P:queues        known queue names
-- ARGV[1..] the ids of the failed jobs to retry
-- Reply: the ids actually moved (a record that is missing, unreadable or names no queue or payload stays; so does
--   one whose id has a job waiting or running again: its status record says queued or scheduled, which only an own
--   or unique id can (issue 25: an equal unique job enqueued after the failure holds the key; two would run).
-- Invariants: the original payload (attempts reset to 0, history kept) goes to the tail of its queue atomically
--   with the removal of the record, so a job is never both failed and queued, nor neither. Its status record says
--   queued again (pcall: never raise after a write). P:failed and P:failed:data are TYPE-checked before the first
--   write (a wrong one: an error reply, nothing moved); a job whose queue key is of the wrong type stays failed;
--   P:queues and the wake list are written with pcall (adversarial review of issue 25: a raise after a push left
--   the job queued and failed, and the next retry queued it twice).
local prefix, failed, failed_data, queues = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local out = {}
for _, kt in ipairs({{failed, 'zset'}, {failed_data, 'hash'}}) do
  local got = wrong_type(kt[1], kt[2])
  if got then
    return redis.error_reply('WRONGTYPE ' .. kt[1] .. ' is a ' .. got .. ', expected a ' .. kt[2] .. ': nothing moved')
  end
end
for i = 1, #ARGV do
  local id = ARGV[i]
  local rec = redis.call('HGET', failed_data, id)
  if rec then
    local ok, doc = pcall(cjson.decode, rec)
    local q = ok and type(doc) == 'table' and doc['queue']
    local was = redis.pcall('HGET', prefix .. ':job:' .. id, 'status')
    if type(q) == 'string' and q ~= '' and type(doc['payload']) == 'string' and was ~= 'queued'
       and was ~= 'scheduled' then
      local payload = doc['payload']
      local pok, job = pcall(cjson.decode, payload)
      if pok and type(job) == 'table' and job['id'] then
        payload = with_fields(payload, '"attempts":0')
      end
      if type(redis.pcall('RPUSH', prefix .. ':queue:' .. q, payload)) == 'number' then
        redis.pcall('SADD', queues, q)
        wake(prefix, q)
        redis.call('HDEL', failed_data, id)  -- (both typed above)
        redis.call('ZREM', failed, id)
        local jk = prefix .. ':job:' .. id
        if redis.pcall('EXISTS', jk) == 1 then redis.pcall('HSET', jk, 'status', 'queued') end
        unique_retake(prefix, id)
        out[#out + 1] = id
      end
    end
  end
end
return out
