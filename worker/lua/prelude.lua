-- prelude.lua: the helpers the scripts share. The loader (worker/lua/__init__.py) puts in front of a script the
-- functions below that it calls (and those they call), in this order; each is one block starting with
-- `local function <name>`, separated by a blank line. They are pure: everything they use comes in as arguments
-- (a script's own locals are not visible here), and every key they touch is built from the prefix their caller
-- received in KEYS (never from ARGV).

-- Redis's clock: ms as a number, the same ms as the string written to records (no number formatting on the hot
-- path), and TIME's own reply {seconds, microseconds}.
local function clock()
  local t = redis.call('TIME')
  local s = t[1] .. string.sub('000' .. string.sub(t[2], 1, -4), -3)
  return tonumber(s), s, t
end

-- The type of `key` when it is neither `want` nor absent, else nil. Scripts check the keys that must take a job or
-- an outcome with it before their first write, and refuse the whole call on a wrong one (issue 27 item 1).
local function wrong_type(key, want)
  local got = redis.call('TYPE', key)['ok']
  if got ~= want and got ~= 'none' then return got end
  return nil
end

-- `list` (a string of key names joined by newlines, or nil) with `key` added: the keys a call found wrong-typed
-- and skipped, named in its reply.
local function add_line(list, key)
  return (list and list .. '\n' or '') .. key
end

-- Ring a wake list for idle workers, once: a token already there is enough. pcall: a wake list of the wrong type
-- is a doorbell that does not ring, never an error after a write.
local function ring(wake_key)
  if redis.pcall('LLEN', wake_key) == 0 then redis.pcall('RPUSH', wake_key, '1') end
end

-- Ring queue q's wake list (P:wake:<q>, derived from the prefix).
local function wake(prefix, q)
  ring(prefix .. ':wake:' .. q)
end

-- Set bookkeeping fields without re-encoding the payload: cjson cannot tell [] from {} and would change the job's
-- own arguments, so the fields are appended as duplicate keys, which JSON decoders (Python's, cjson) resolve to
-- the last occurrence. Payloads are objects with at least an id, so the body before the final brace is never
-- empty. Growth is bounded: only recovery (at most MAX_ATTEMPTS times) and failed-retry append.
local function with_fields(p, fragment)
  local body = string.match(p, '^(.*)}%s*$')
  if not body then return p end
  return body .. ',' .. fragment .. '}'
end

-- A job's status record (P:job:<id>): written with pcall, so a key of the wrong type never aborts a script.
local function jset(prefix, id, ...)
  if id and id ~= '' then redis.pcall('HSET', prefix .. ':job:' .. id, ...) end
end

-- Wake whoever waits for job <id> (Job.wait): push its final record ('<status>\n<result or failure JSON>') to
-- P:done:<id>, kept 60 s. Called only for a waited-for job: one whose status record had an expiry before its outcome
-- set one (await.lua gives a waiting job's record one; see cycle.lua's 'PEXPIRE ... NX'). pcall only.
local function notify(prefix, id, status, body)
  local dk = prefix .. ':done:' .. id
  if type(redis.pcall('RPUSH', dk, status .. '\n' .. body)) == 'number' then redis.pcall('PEXPIRE', dk, 60000) end
end

-- The failed registry (P:failed, P:failed:data): add a record, count it (P:stat:failed), then trim what is past
-- ttl_ms (FAILED_TTL) or beyond max_n (FAILED_MAX). The caller TYPE-checks P:failed and P:failed:data before its
-- first write (wrong_type), so the redis.call writes here cannot raise.
local function record_failure(prefix, now, id, record, max_n, ttl_ms)
  local fz, fd = prefix .. ':failed', prefix .. ':failed:data'
  redis.call('ZADD', fz, now, id)
  redis.call('HSET', fd, id, record)
  redis.pcall('INCR', prefix .. ':stat:failed')
  local old = redis.call('ZRANGEBYSCORE', fz, '-inf', now - ttl_ms, 'LIMIT', 0, 500)
  for _, v in ipairs(old) do redis.call('HDEL', fd, v); redis.call('ZREM', fz, v) end
  local n = redis.call('ZCARD', fz)
  if n > max_n then
    local extra = redis.call('ZRANGE', fz, 0, n - max_n - 1)
    for _, v in ipairs(extra) do redis.call('HDEL', fd, v) end
    redis.call('ZREMRANGEBYRANK', fz, 0, n - max_n - 1)
  end
end

-- A failed record decoded (ok, doc). cjson refuses a lone surrogate escape (Python's json writes one for a
-- surrogate-escaped file name): such a record is decoded again with those escapes replaced, only to read its name
-- and type.
local function decode_record(raw)
  local ok, doc = pcall(cjson.decode, raw)
  if not ok then ok, doc = pcall(cjson.decode, (string.gsub(raw, '\\u[dD][89abAB]%x%x', '?'))) end
  if not ok then ok, doc = pcall(cjson.decode, (string.gsub(raw, '\\u[dD][c-fC-F]%x%x', '?'))) end
  return ok, doc
end

-- unique_until="start" (issue 25): a job whose id is 'us:<key>:<random>' holds the lock P:unique:us:<key> (its
-- value: the holder's id) while it waits to start. The lock of `id`, or nil for any other id.
local function unique_lock(prefix, id)
  local key = type(id) == 'string' and string.match(id, '^(us:.+):%w+$')
  return key and (prefix .. ':unique:' .. key)
end

-- The claim of job `id`: its key is free again, if it still names this job (pcall only).
local function unique_free(prefix, id)
  local lock = unique_lock(prefix, id)
  if lock and redis.pcall('GET', lock) == id then redis.pcall('DEL', lock) end
end

-- Job `id` waits to start again (a put-back, a retry, a recovery): it takes its key back unless another job that
-- waits to start holds it (its record says queued or scheduled; the claim freed the key of any job that started).
-- Then two jobs of the key wait: the older one (this) and the holder. pcall only.
local function unique_retake(prefix, id)
  local lock = unique_lock(prefix, id)
  if not lock then return end
  local held = redis.pcall('GET', lock)
  if type(held) == 'string' and held ~= id then
    local was = redis.pcall('HGET', prefix .. ':job:' .. held, 'status')
    if was == 'queued' or was == 'scheduled' then return end
  end
  redis.pcall('SET', lock, id)
end

-- Up to n jobs held back by job <name>'s concurrency limit (P:held:<name>, each element '<queue>\n<payload>',
-- oldest first) back to the head of the queue each was claimed from, with a wake-up (issue 25). pcall only: a
-- wrong-typed key leaves the job held and is named. Returns `odd` (add_line) with such keys added.
local function release_held(prefix, name, n, odd)
  local hk = prefix .. ':held:' .. name
  for _ = 1, n do
    local e = redis.pcall('LPOP', hk)
    if type(e) ~= 'string' then
      if type(e) == 'table' and e.err then odd = add_line(odd, hk) end
      return odd
    end
    local q, p = string.match(e, '^([^\n]*)\n(.*)$')
    if not q or q == '' then q, p = 'default', p or e end
    if type(redis.pcall('LPUSH', prefix .. ':queue:' .. q, p)) == 'number' then
      wake(prefix, q)
      redis.pcall('SADD', prefix .. ':queues', q)
    else
      redis.pcall('LPUSH', hk, e)
      return add_line(odd, prefix .. ':queue:' .. q)
    end
  end
  return odd
end

-- Groups (issue 25 item 4). A member's payload starts '{"id":"<id>","group":"<gid>"', its group's callback's
-- '{"id":"<id>","gdone":"<gid>"' (worker/jobgroups.py writes them so): `kind, gid` of payload `p` of job `id`, or nil.
-- A job of neither kind pays one string.sub.
local function group_of(p, id)
  local at = 9 + #id
  local m = string.sub(p, at, at + 9)
  if m ~= ',"group":"' and m ~= ',"gdone":"' then return nil end
  if string.sub(p, 1, at - 1) ~= '{"id":"' .. id .. '"' then return nil end
  return string.sub(m, 3, 7), string.match(p, '^([%w_%.:%-]+)"', at + 10)
end

-- Member <id> of group <gid> ended (status done|failed|canceled; body: its result JSON or failure record). Recorded
-- once (HSETNX of the id into P:group_res:<gid>: a repeated call, a re-run or a recovered member counts
-- nothing twice); the call that records the last member moves the group's callback payload to its queue. Only for
-- a group that exists (P:group:<gid> has 'pending'). pcall throughout: never raises. Returns a key found
-- wrong-typed, else nil.
local function group_end(prefix, gid, id, status, body, now_s)
  local gk = prefix .. ':group:' .. gid
  local left = redis.pcall('HGET', gk, 'pending')
  if type(left) ~= 'string' then return (type(left) == 'table') and gk or nil end
  local rk = prefix .. ':group_res:' .. gid
  local new = redis.pcall('HSETNX', rk, id, status .. '\n' .. body)
  if new ~= 1 then return (type(new) == 'table') and rk or nil end
  redis.pcall('HINCRBY', gk, status, 1)
  if redis.pcall('HINCRBY', gk, 'pending', -1) ~= 0 then return nil end
  local cb = redis.pcall('HMGET', gk, 'cb', 'cb_id', 'cb_name', 'cb_queue')
  if type(cb) ~= 'table' or not cb[1] or not cb[4] then return nil end
  local qk = prefix .. ':queue:' .. cb[4]
  if type(redis.pcall('RPUSH', qk, cb[1])) ~= 'number' then
    redis.pcall('HSET', gk, 'cb_stuck', qk)  -- its queue is not a list: shown by get_group
    return qk
  end
  redis.pcall('SADD', prefix .. ':queues', cb[4])
  wake(prefix, cb[4])
  redis.pcall('HSET', gk, 'fired', now_s)
  redis.pcall('HSET', prefix .. ':job:' .. cb[2], 'status', 'queued', 'name', cb[3], 'queue', cb[4],
              'enqueued_at', now_s, 'attempts', 0, 'group', gid)
  return nil
end

-- A group's callback ended for good: the group's keys (P:group:<gid>, P:group_ids:<gid>, P:group_res:<gid>) expire
-- when its status record does (keep ms; '0': now). pcall only.
local function group_close(prefix, gid, keep)
  for _, k in ipairs({prefix .. ':group:' .. gid, prefix .. ':group_ids:' .. gid, prefix .. ':group_res:' .. gid}) do
    if keep ~= '0' then redis.pcall('PEXPIRE', k, keep) else redis.pcall('DEL', k) end
  end
end
