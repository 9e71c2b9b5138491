-- HEARTBEAT: a worker's beat, on the Redis clock shared by every dyno.
-- KEYS[1] workers  P:workers        worker name -> deadline (ms): now + the worker's own HEARTBEAT_TTL
-- KEYS[2] worker   P:worker:<w>     its hash: 'seen' = the time of the beat (ms)
-- ARGV[1] worker_name  <w>
-- ARGV[2] ttl_ms       its HEARTBEAT_TTL
-- Reply: nil.
-- Invariants: the score is the worker's own deadline, so every worker is judged by its own settings (RECOVER).
local workers, worker_hash = KEYS[1], KEYS[2]
local worker_name, ttl_ms = ARGV[1], tonumber(ARGV[2])
local now = clock()
redis.call('ZADD', workers, now + ttl_ms, worker_name)
redis.call('HSET', worker_hash, 'seen', now)
