"""Lua bookkeeping must never change a job's own arguments (cjson turns [] into {} if it re-encodes)."""
import json

from tests.support import seen_late_long_ago
from worker.config import from_mapping
from worker.failed import FailedRegistry
from worker.fetch import Broker

ARGS = [[], {}, [[]], "x", 1.5]
KWARGS = {"items": [], "opts": {}, "nested": {"empty": []}}


def _broker(r, **env):
    url = "redis://{host}:{port}/{db}".format(**r.connection_pool.connection_kwargs)
    return Broker(r, from_mapping({"REDIS_URL": url, **env}))


def _payload(job_id="j1", **extra):
    return json.dumps({"id": job_id, "name": "push", "queue": "default", "args": ARGS, "kwargs": KWARGS,
                       "enqueued_at": 1.0, "attempts": 0, **extra})


def test_recovery_keeps_arguments_and_counts_the_attempt(r):
    b = _broker(r, HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="2")
    r.zadd("worker:workers", {"dead:1": 0})  # heartbeat at the epoch: long expired
    r.rpush("worker:processing:dead:1", _payload())
    seen_late_long_ago(r, "dead:1")
    assert b.recover() == ["requeued:j1"]
    doc = json.loads(r.lindex("worker:queue:default", 0))
    assert doc["args"] == ARGS and doc["kwargs"] == KWARGS
    assert doc["attempts"] == 1
    assert [e["cause"] for e in doc["errors"]] == ["lost"]
    assert r.exists("worker:processing:dead:1") == 0 and r.zscore("worker:workers", "dead:1") is None
    # a second loss adds to the count and the history
    r.delete("worker:queue:default")
    r.zadd("worker:workers", {"dead:2": 0})
    r.rpush("worker:processing:dead:2", json.dumps(doc))
    seen_late_long_ago(r, "dead:2")
    b.recover()
    doc2 = json.loads(r.lindex("worker:queue:default", 0))
    assert doc2["attempts"] == 2 and len(doc2["errors"]) == 2 and doc2["args"] == ARGS


def test_failed_retry_keeps_arguments_and_resets_attempts(r):
    b = _broker(r)
    rec = {"id": "j2", "name": "push", "queue": "default", "payload": _payload("j2", attempts=3), "cause": "error"}
    r.zadd("worker:failed", {"j2": 1})
    r.hset("worker:failed:data", "j2", json.dumps(rec))
    assert FailedRegistry(b).retry(["j2"]) == ["j2"]
    doc = json.loads(r.lindex("worker:queue:default", 0))
    assert doc["args"] == ARGS and doc["kwargs"] == KWARGS and doc["attempts"] == 0
    assert r.zcard("worker:failed") == 0 and r.hlen("worker:failed:data") == 0


def test_a_restarted_worker_never_shares_keys_with_its_previous_incarnation(r):
    """Heroku reuses $DYNO and dynos start with small pids: worker.1:4 may come back as worker.1:4 while the old
    one is still shutting down or left a job behind. The new worker must take another name."""
    import io

    from worker.log import Logger
    from worker.supervisor import Supervisor
    b = _broker(r, DYNO="worker.1")
    sup = Supervisor(b.cfg, b, Logger("INFO", stream=io.StringIO()))
    old = sup.name
    assert old.startswith("worker.1:")
    r.rpush(f"worker:processing:{old}", _payload("left-behind"))
    sup._register()
    assert sup.name != old and sup.name.startswith(old + ":")
    assert r.lrange(f"worker:processing:{old}", 0, -1) == [_payload("left-behind")]
    assert r.zscore("worker:workers", sup.name) is not None
    fresh = Supervisor(b.cfg, b, Logger("INFO", stream=io.StringIO()))
    fresh.name = "worker.1:99999"
    fresh._register()
    assert fresh.name == "worker.1:99999"
