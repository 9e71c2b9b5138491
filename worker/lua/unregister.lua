-- UNREGISTER: a worker leaves the registry, unless it still holds a claimed job.
-- KEYS[1] workers     P:workers          worker name -> deadline
-- KEYS[2] processing  P:processing:<w>   its claimed jobs
-- KEYS[3] worker      P:worker:<w>       its hash
-- ARGV[1] worker_name  <w>
-- Reply: 1 unregistered; 0 left registered (its hash says state=exited).
-- Invariants: an unacknowledged job is never dropped by exiting: with a non-empty processing list the worker stays
--   registered, so recovery finds it after its deadline.
local workers, processing, worker_hash = KEYS[1], KEYS[2], KEYS[3]
local worker_name = ARGV[1]
if redis.call('LLEN', processing) > 0 then
  redis.call('HSET', worker_hash, 'state', 'exited')
  return 0
end
redis.call('ZREM', workers, worker_name)
redis.call('DEL', worker_hash)
return 1
