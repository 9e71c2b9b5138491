-- CANCEL: take a queued or scheduled job (its retry too) out so that it never runs, and mark it canceled.
-- KEYS[1] prefix     P              the key space's root; derived from it: P:job:<id>, P:queue:<q> (the queue its
--                                   record names), P:done:<id> (notify), P:unique:<key> (unique_until="start")
--                                   record names), P:done:<id> (notify), P:held:<name> (issue 25: a job held back
--                                   by its concurrency limit, its record's name)
-- KEYS[2] scheduled  P:scheduled    delayed jobs and retries
-- KEYS[3] workers    P:workers      live workers (running: derived from the prefix, P:worker:<w> and P:cancel:<w>)
-- ARGV[1] job_id     <id>
-- ARGV[2] keep_ms    how long the canceled record is kept (RESULT_TTL, ms)
-- ARGV[3] running    '1': if a worker runs it, ask that worker to stop it (SADD P:cancel:<w>, kept a day; the worker
--                    pops it at its next beat: TermException in the job, status canceled, not put back)
-- Reply: {1} canceled; {2, worker} (running) that worker was asked to stop it; {0, reason}: nothing done,
--   reason 'unknown' (no status record), '<status>' (done, failed, canceled: it has ended), 'running' (queued
--   per its record but in no queue: a worker has claimed it), 'missing' (scheduled but not found), 'wrongtype'.
-- Invariants: atomic with the claim (CYCLE): a job is either still in its queue and removed here (it never runs) or
--   claimed (not found here: cancel returns 0, the job runs). The job is found by its payload's head
--   ('{"id":"<id>"', how producers write it), scanning its queue, P:scheduled or P:held:<name> in chunks of 1000:
--   O(length).
--   Nothing is written before the job is found. A group's member canceled here is recorded in its group in this
--   call (prelude group_end: P:group:<gid>..., derived from the prefix; the last member queues the callback).
local prefix, scheduled, workers = KEYS[1], KEYS[2], KEYS[3]
local job_id, keep_ms, running = ARGV[1], ARGV[2], ARGV[3] == '1'

local jk = prefix .. ':job:' .. job_id
local head = '{"id":"' .. job_id .. '"'
local rec = redis.pcall('HMGET', jk, 'status', 'queue', 'name')
if type(rec) ~= 'table' or rec.err then return {0, 'wrongtype'} end
local status, q = rec[1], rec[2]
if not status then return {0, 'unknown'} end
if status ~= 'queued' and status ~= 'scheduled' then return {0, status} end

-- where to look: its queue (when queued), then the schedule (scheduled, or a retry)
local places = {}
if status == 'queued' and q then places[1] = {prefix .. ':queue:' .. q, 'LLEN', 'LRANGE', 'LREM'} end
places[#places + 1] = {scheduled, 'ZCARD', 'ZRANGE', 'ZREM'}
if status == 'queued' and q and rec[3] then  -- held back by its concurrency limit: '<queue>\n<payload>'
  places[#places + 1] = {prefix .. ':held:' .. rec[3], 'LLEN', 'LRANGE', 'LREM', q .. '\n' .. head}
end
local raw, from = nil, nil
for _, place in ipairs(places) do
  local n = redis.pcall(place[2], place[1])
  if type(n) == 'number' then
    for i = 0, n - 1, 1000 do
      for _, v in ipairs(redis.call(place[3], place[1], i, i + 999)) do
        local want = place[5] or head
        if string.sub(v, 1, #want) == want then raw = v; break end
      end
      if raw then break end
    end
  end
  if raw then from = place; break end
end
if not raw and status == 'queued' and running then  -- find the worker whose slot holds it (job:<slot>)
  local ws = redis.pcall('ZRANGE', workers, 0, -1)
  for _, w in ipairs(type(ws) == 'table' and not ws.err and ws or {}) do
    local h = redis.pcall('HGETALL', prefix .. ':worker:' .. w)
    for i = 1, (type(h) == 'table' and not h.err) and #h or 0, 2 do
      if string.sub(h[i], 1, 4) == 'job:' and string.sub(h[i + 1], 1, #head) == head then
        local ck = prefix .. ':cancel:' .. w
        if type(redis.pcall('SADD', ck, job_id)) ~= 'number' then return {0, 'wrongtype'} end
        redis.pcall('PEXPIRE', ck, 86400000)
        return {2, w}
      end
    end
  end
end
if not raw then return {0, status == 'queued' and 'running' or 'missing'} end
if from[4] == 'LREM' then redis.call('LREM', from[1], 1, raw) else redis.call('ZREM', from[1], raw) end
unique_free(prefix, job_id)  -- unique_until="start": its key is free (it never starts)
local now, now_s = clock()
if redis.call('PTTL', jk) > 0 then notify(prefix, job_id, 'canceled', '') end  -- a waiter's mark (await.lua)
redis.pcall('HSET', jk, 'status', 'canceled', 'ended_at', now_s)
if keep_ms ~= '0' then redis.pcall('PEXPIRE', jk, keep_ms) else redis.pcall('DEL', jk) end
local kind, gid = group_of(raw, job_id)  -- a group's member counts as ended; a callback's group keys expire with it
if gid and kind == 'group' then group_end(prefix, gid, job_id, 'canceled', '', now_s)
elseif gid then group_close(prefix, gid, keep_ms) end
return {1}
