-- AWAIT: Job.wait's mark: ask the script that records job <id>'s outcome to push it to P:done:<id>.
-- KEYS[1] prefix  P   the key space's root; derived from it: P:job:<id>
-- ARGV[1] job_id  <id>
-- Reply: the job's status ('' if it has no status record: unknown or expired).
-- Invariants: writes only to an existing record (a missing one is not created: it would never expire); the
--   'waiting' field lives and expires with the record.
local prefix = KEYS[1]
local job_id = ARGV[1]
local jk = prefix .. ':job:' .. job_id
local status = redis.pcall('HGET', jk, 'status')
if type(status) ~= 'string' then return '' end
redis.pcall('HSET', jk, 'waiting', '1')
return status
