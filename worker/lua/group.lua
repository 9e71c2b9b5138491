-- GROUP: enqueue one chunk (at most 1,000) of a group's members (issue 25 item 4); a group of n members is
-- ceil(n / 1000) calls, sent in one MULTI transaction (worker/jobgroups.py), chunk 1 first.
-- KEYS[1] prefix   P                  the key space's root; derived from it: P:queue:<q>, P:wake:<q>, P:job:<id>
-- KEYS[2] group    P:group:<gid>      the group: total, pending, done, failed, canceled, created (ms), fired (ms),
--                                     cb (the callback's payload, queued when the last member ends), cb_id,
--                                     cb_name, cb_queue, c<k> (chunk k written)
-- KEYS[3] ids      P:group_ids:<gid>  the member ids in member order
-- KEYS[4] results  P:group_res:<gid>  member id -> "<status>\n<result JSON or failure record>" (written as they end)
-- KEYS[5] queues   P:queues           known queue names
-- ARGV[1] chunk     k (1-based)
-- ARGV[2] total     n, the group's member count
-- ARGV[3] gid       the group id (written into the callback's status record when it is queued)
-- ARGV[4] cb        the callback's payload (chunk 1 only)
-- ARGV[5] cb_id     its job id
-- ARGV[6] cb_name   its job name
-- ARGV[7] cb_queue  its queue
-- ARGV[8] nq        then nq queue names: chunk 1, every queue of the group's members (TYPE-checked there: the
--                   transaction's later chunks cannot fail on a wrong-typed queue after chunk 1 wrote)
--   then m, the members in this chunk; then m quadruples: id, name, queue, payload (each payload starts
--   '{"id":"<id>","group":"<gid>"', which the scripts that record a job's end read)
-- Reply: 1 written; 0 a repeated call (chunk k was written already: nothing done); or an error reply
--   'WRONGTYPE <key> is a <type>, expected a <type>: nothing enqueued'.
-- Invariants: chunk 1 writes the total and the callback before any member is queued, so no member can end before
--   its group knows how many it has; the whole group is one transaction, so a producer that dies half-way queues
--   none. Re-sent calls (redis-py after a timeout) find c<k> and write nothing twice. The group, its ids list and
--   every member's queue are TYPE-checked before the first write. A group of 0 members queues its callback at once.
--   The group's keys have no expiry until its callback ends (prelude group_close).
local prefix, group, ids, results, queues = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local chunk, total, gid, cb, cb_id, cb_name, cb_queue = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local nq = tonumber(ARGV[8])
local QUEUES_AT = 9                     -- ARGV[QUEUES_AT ..]: the nq queue names
local m = tonumber(ARGV[QUEUES_AT + nq])
local MEMBERS_AT = QUEUES_AT + nq + 1  -- ARGV[MEMBERS_AT + 4 * (i - 1) ..]: member i's id, name, queue, payload
for _, kt in ipairs({{group, 'hash'}, {ids, 'list'}, {results, 'hash'}}) do
  local got = wrong_type(kt[1], kt[2])
  if got then
    return redis.error_reply('WRONGTYPE ' .. kt[1] .. ' is a ' .. got .. ', expected a ' .. kt[2] .. ': nothing enqueued')
  end
end
local seen, checked = {}, {}
if chunk == '1' then checked[cb_queue] = true end
for i = QUEUES_AT, QUEUES_AT + nq - 1 do checked[ARGV[i]] = true end
for at = MEMBERS_AT, MEMBERS_AT + 4 * m - 1, 4 do
  seen[ARGV[at + 2]] = true
end
for q in pairs(seen) do checked[q] = true end
for q in pairs(checked) do
  local qk = prefix .. ':queue:' .. q
  local got = wrong_type(qk, 'list')
  if got then
    return redis.error_reply('WRONGTYPE ' .. qk .. ' is a ' .. got .. ', expected a list: nothing enqueued')
  end
end
if redis.call('HSETNX', group, 'c' .. chunk, '1') == 0 then return 0 end
local now, now_s = clock()
if chunk == '1' then
  redis.call('HSET', group, 'total', total, 'pending', total, 'done', 0, 'failed', 0, 'canceled', 0,
             'created', now_s, 'cb', cb, 'cb_id', cb_id, 'cb_name', cb_name, 'cb_queue', cb_queue)
end
for at = MEMBERS_AT, MEMBERS_AT + 4 * m - 1, 4 do
  local id, q = ARGV[at], ARGV[at + 2]
  redis.call('RPUSH', ids, id)
  jset(prefix, id, 'status', 'queued', 'name', ARGV[at + 1], 'queue', q, 'enqueued_at', now, 'attempts', 0,
       'group', gid)
  redis.call('RPUSH', prefix .. ':queue:' .. q, ARGV[at + 3])
end
for q in pairs(seen) do
  redis.pcall('SADD', queues, q)
  wake(prefix, q)
end
if chunk == '1' and total == '0' then  -- nothing to wait for
  redis.call('RPUSH', prefix .. ':queue:' .. cb_queue, cb)
  redis.pcall('SADD', queues, cb_queue)
  wake(prefix, cb_queue)
  redis.call('HSET', group, 'fired', now_s)
  jset(prefix, cb_id, 'status', 'queued', 'name', cb_name, 'queue', cb_queue, 'enqueued_at', now, 'attempts', 0,
       'group', gid)
end
return 1
