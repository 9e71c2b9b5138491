-- ENQUEUE: put jobs on a queue (or into the schedule), once per call however often redis-py re-sends it.
-- KEYS[1] prefix     P              the key space's root; derived from it: P:job:<id> (each job's status record),
--                                   P:wake:<q> (the queue's wake list), P:done:<id> (unique: a stale wake-up),
--                                   P:unique:<key> (unique 's': the lock, <key> from the job's id us:<key>:<random>)
-- KEYS[2] queue      P:queue:<q>    where a job due now goes (tail)
-- KEYS[3] queues     P:queues       known queue names
-- KEYS[4] scheduled  P:scheduled    where a job due later goes (score: due time, ms)
-- KEYS[5] dedupe     P:enq:<id>     this call's dedupe marker (<id>: its first job's id)
-- ARGV[1] queue_name   q
-- ARGV[2] dedupe_ms    how long the dedupe marker lives
-- ARGV[3] when         '' = now, '+<ms>' = that long after Redis's clock, '@<ms>' = at that unix time (ms)
-- ARGV[4] job_name     the jobs' name (one name per call)
-- ARGV[5] unique       '1': one job with the producer's own id (job_id=): enqueue nothing while a job of that id
--                      is queued, scheduled or running (its record says queued or scheduled: the claim writes none);
--                      's': one job of unique_until="start", id us:<key>:<random>: enqueue nothing while the job
--                      P:unique:us:<key> names waits to start (its record says queued or scheduled: the claim deletes
--                      the lock of a job it takes, cycle.lua), else take the lock; '' none
-- ARGV[6] n            the number of jobs; then n job ids, then their n payloads (in the same order)
-- Reply: 1 queued, 2 scheduled, 0 a repeated call (found its dedupe marker: nothing done), 3 (unique) a job of
--   that id has not ended: nothing done, or an error reply 'WRONGTYPE <key> is a <type>, expected a <type>:
--   nothing enqueued'. Unique 's': the id of the job that holds the key (this call's, or the one waiting already;
--   a repeated call gets the first copy's answer from its dedupe marker).
-- Invariants: each job gets its status record P:job:<id> (status, name, queue, enqueued_at ms, attempts), without
--   expiry until the job ends. A call redis-py re-sends after a timeout (its first copy may already have run, or be
--   buffered in a stalled server) finds its dedupe key and does nothing: one key per call, not per job. Due times
--   are computed on the Redis clock, the one that moves scheduled jobs. Nothing may raise once the job is queued (an
--   app that retries would enqueue it twice): the key that takes the job is TYPE-checked before any write, and what
--   follows the push (P:queues, the wake list, status records) uses pcall. A unique_until="start" lock
--   (P:unique:<key>, no expiry) counts only while the job it names waits to start: its status record (no TTL)
--   decides, so a lock left by a job that ended or vanished is taken over, never obeyed.
local prefix, queue, queues, scheduled, dedupe = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local queue_name, dedupe_ms, when, job_name, mode = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local unique = mode == '1'
local n = tonumber(ARGV[6])
local IDS_AT = 7                   -- ARGV[IDS_AT .. IDS_AT + n - 1]: the job ids
local payloads_at = IDS_AT + n     -- ARGV[payloads_at .. #ARGV]: their payloads
local now = clock()
local due = nil
if when ~= '' then
  due = tonumber(string.sub(when, 2))
  if string.sub(when, 1, 1) == '+' then due = now + due end
end
local is_scheduled = due and due > now
local dest, want = queue, 'list'
if is_scheduled then dest, want = scheduled, 'zset' end
local got = wrong_type(dest, want)
if got then
  return redis.error_reply('WRONGTYPE ' .. dest .. ' is a ' .. got .. ', expected a ' .. want .. ': nothing enqueued')
end
if mode == 's' then  -- unique_until="start": the lock names the job that waits to start, if one does
  local id = ARGV[IDS_AT]
  local lock = unique_lock(prefix, id)
  got = lock and wrong_type(lock, 'string')
  if got then
    return redis.error_reply('WRONGTYPE ' .. lock .. ' is a ' .. got .. ', expected a string: nothing enqueued')
  end
  local held = lock and redis.call('GET', lock)
  if held and held ~= id then
    local was = redis.pcall('HGET', prefix .. ':job:' .. held, 'status')
    if was == 'queued' or was == 'scheduled' then id = held end
  end
  if not redis.call('SET', dedupe, id, 'NX', 'PX', dedupe_ms) then return redis.call('GET', dedupe) end
  if id ~= ARGV[IDS_AT] then return id end
  if lock then redis.call('SET', lock, id) end  -- (typed above)
elseif not redis.call('SET', dedupe, '1', 'NX', 'PX', dedupe_ms) then
  return 0
end
if unique then  -- an own id: taken while its job has not ended; once it has, its old record and wake-up go
  local jk = prefix .. ':job:' .. ARGV[IDS_AT]
  local was = redis.pcall('HGET', jk, 'status')
  if was == 'queued' or was == 'scheduled' then return 3 end
  redis.pcall('DEL', jk, prefix .. ':done:' .. ARGV[IDS_AT])
end
local status = is_scheduled and 'scheduled' or 'queued'
for i = IDS_AT, payloads_at - 1 do
  jset(prefix, ARGV[i], 'status', status, 'name', job_name, 'queue', queue_name,
       'enqueued_at', is_scheduled and due or now, 'attempts', 0)
end
if is_scheduled then
  for i = payloads_at, #ARGV do redis.call('ZADD', scheduled, due, ARGV[i]) end
  return mode == 's' and ARGV[IDS_AT] or 2
end
redis.call('RPUSH', queue, unpack(ARGV, payloads_at))
redis.pcall('SADD', queues, queue_name)
wake(prefix, queue_name)
return mode == 's' and ARGV[IDS_AT] or 1
