"""Lua bookkeeping must never change a job's own arguments (cjson turns [] into {} if it re-encodes)."""
import json

from tests.support import make_broker, seen_late_long_ago
from worker.failed import FailedRegistry

ARGS = [[], {}, [[]], "x", 1.5]
KWARGS = {"items": [], "opts": {}, "nested": {"empty": []}}


def _payload(job_id="j1", **extra):
    return json.dumps({"id": job_id, "name": "push", "queue": "default", "args": ARGS, "kwargs": KWARGS,
                       "enqueued_at": 1.0, "attempts": 0, **extra})


def test_recovery_keeps_arguments_and_counts_the_attempt(r):
    b = make_broker(r, HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="2")
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
    b = make_broker(r)
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
    b = make_broker(r, DYNO="worker.1")
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


def test_repeated_recoveries_carry_each_runtime_field_once(r):
    """Issue 27 item 3: each recovery appended its attempts/errors beside the previous recovery's (duplicate keys,
    the history repeated each time). A recovery replaces the fragment the previous one appended."""
    b = make_broker(r, HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="2", MAX_ATTEMPTS="10")
    payload = _payload()
    for n in range(1, 4):
        r.zadd("worker:workers", {f"dead:{n}": 0})
        r.rpush(f"worker:processing:dead:{n}", payload)
        seen_late_long_ago(r, f"dead:{n}")
        assert b.recover() == ["requeued:j1"]
        payload = r.lpop("worker:queue:default")
    assert payload.count('"errors":') == 1 and payload.count('"attempts":') == 2  # the producer's 0, and ours
    doc = json.loads(payload)
    assert doc["attempts"] == 3 and len(doc["errors"]) == 3
    assert doc["args"] == ARGS and doc["kwargs"] == KWARGS


def test_recovery_puts_a_job_back_in_the_queue_it_was_claimed_from(r):
    """Issue 27 item 6: a payload without a ``queue`` field (or naming another) was recovered into ``default``,
    which nobody may serve; the dead worker's hash says where it was claimed from (queue:<slot>)."""
    b = make_broker(r, HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="2")
    p = json.dumps({"id": "q1", "name": "push", "args": [], "kwargs": {}})
    r.zadd("worker:workers", {"dead:1": 0})
    r.rpush("worker:processing:dead:1", p)
    r.hset("worker:worker:dead:1", mapping={"job:0": p, "queue:0": "mail"})
    seen_late_long_ago(r, "dead:1")
    assert b.recover() == ["requeued:q1"]
    assert r.llen("worker:queue:default") == 0
    assert json.loads(r.lindex("worker:queue:mail", 0))["id"] == "q1"
