-- AWAIT: Job.wait's mark: ask the script that records job <id>'s outcome to push it to P:done:<id>.
-- KEYS[1] prefix  P   the key space's root; derived from it: P:job:<id>
-- ARGV[1] job_id   <id>
-- ARGV[2] mark_ms  the expiry that marks a waited-for record (a year)
-- Reply: the job's status ('' if it has no status record: unknown or expired).
-- Invariants: the mark is an expiry on a record that has none (a job not ended: its record has no expiry until
--   its outcome sets one). The outcome's 'PEXPIRE ... NX' finds it and notifies (cycle.lua): jobs nobody waits
--   for pay nothing. A missing record is not created.
local prefix = KEYS[1]
local job_id, mark_ms = ARGV[1], ARGV[2]
local jk = prefix .. ':job:' .. job_id
local status = redis.pcall('HGET', jk, 'status')
if type(status) ~= 'string' then return '' end
if redis.call('PTTL', jk) == -1 then redis.call('PEXPIRE', jk, mark_ms) end
return status
