-- CANCEL: take a queued or scheduled job (its retry too) out so that it never runs, and mark it canceled.
-- KEYS[1] prefix     P              the key space's root; derived from it: P:job:<id>, P:queue:<q> (the queue its
--                                   record names), P:done:<id> (notify)
-- KEYS[2] scheduled  P:scheduled    delayed jobs and retries
-- ARGV[1] job_id     <id>
-- ARGV[2] keep_ms    how long the canceled record is kept (RESULT_TTL, ms)
-- Reply: {1} canceled; {0, reason}: nothing done, reason 'unknown' (no status record), '<status>' (done, failed,
--   canceled: it has ended), 'running' (queued per its record but in no queue: a worker has claimed it), 'wrongtype'.
-- Invariants: atomic with the claim (CYCLE): a job is either still in its queue and removed here (it never runs) or
--   claimed (not found here: cancel returns 0, the job runs). The job is found by its payload's head
--   ('{"id":"<id>"', how producers write it), scanning its queue or P:scheduled in chunks of 1000: O(length).
--   Nothing is written before the job is found.
local prefix, scheduled = KEYS[1], KEYS[2]
local job_id, keep_ms = ARGV[1], ARGV[2]
local jk = prefix .. ':job:' .. job_id
local head = '{"id":"' .. job_id .. '"'
local rec = redis.pcall('HMGET', jk, 'status', 'queue')
if type(rec) ~= 'table' or rec.err then return {0, 'wrongtype'} end
local status, q = rec[1], rec[2]
if not status then return {0, 'unknown'} end
if status ~= 'queued' and status ~= 'scheduled' then return {0, status} end

-- where to look: its queue (when queued), then the schedule (scheduled, or a retry)
local places = {}
if status == 'queued' and q then places[1] = {prefix .. ':queue:' .. q, 'LLEN', 'LRANGE', 'LREM'} end
places[#places + 1] = {scheduled, 'ZCARD', 'ZRANGE', 'ZREM'}
local raw, from = nil, nil
for _, place in ipairs(places) do
  local n = redis.pcall(place[2], place[1])
  if type(n) == 'number' then
    for i = 0, n - 1, 1000 do
      for _, v in ipairs(redis.call(place[3], place[1], i, i + 999)) do
        if string.sub(v, 1, #head) == head then raw = v; break end
      end
      if raw then break end
    end
  end
  if raw then from = place; break end
end
if not raw then return {0, status == 'queued' and 'running' or 'missing'} end
if from[4] == 'LREM' then redis.call('LREM', from[1], 1, raw) else redis.call('ZREM', from[1], raw) end
local now, now_s = clock()
notify(prefix, job_id, 'canceled', '')
redis.pcall('HSET', jk, 'status', 'canceled', 'ended_at', now_s)
if keep_ms ~= '0' then redis.pcall('PEXPIRE', jk, keep_ms) else redis.pcall('DEL', jk) end
return {1}
