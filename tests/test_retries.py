"""Retries with backoff, delayed jobs, and the failed registry (CLI and API): a failed job is retried or recorded,
a delayed job runs no sooner than asked and exactly once, and the failed registry stays bounded (``--limit``
checked, messages a strict-UTF-8 stdout cannot encode escaped).
"""
from __future__ import annotations

import json
import re
import signal
import time
from datetime import datetime, timedelta, timezone

import pytest
import redis

import worker
import worker.config
import worker.jobs
from worker.failed import FailedRegistry
from worker.fetch import Broker

from tests.support import job_json, make_broker, wait_until
import tests.jobs_chaos  # noqa: F401,E402  (registers nl_stamp: enqueue by name needs the job's module imported)

MODULES = "worker.sample,tests.jobs,tests.jobs_chaos"
QUEUE = "worker:queue:default"


@pytest.fixture
def broker(redis_server, r, monkeypatch):
    """An in-process broker on the test Redis, also used by worker.enqueue_in/enqueue_at."""
    b = Broker(redis.Redis.from_url(redis_server.url, decode_responses=True),
               worker.config.from_mapping({"REDIS_URL": redis_server.url}))
    monkeypatch.setattr(worker.jobs, "_default", b)
    yield b
    b.r.close()


def events(r, key, n, timeout=20.0) -> list:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        # sliced: one BLPOP must stay under the client's socket timeout (5 s by default)
        got = r.blpop(key, min(2.0, max(0.1, deadline - time.monotonic())))
        if got is None and time.monotonic() < deadline:
            continue
        assert got is not None, f"{len(out)} of {n} events on {key!r} within {timeout}s"
        out.append(json.loads(got[1]))
    return out


def nothing_in_flight(r) -> bool:
    return (r.llen(QUEUE) == 0 and r.zcard("worker:scheduled") == 0
            and not any(r.llen(k) for k in r.keys("worker:processing:*")))


def burst(spawn, **env):
    w = spawn("--burst", JOB_MODULES=MODULES, **env)
    assert w.wait(60) == 0, w.output
    return w


# --- retries ---

def test_flaky_job_succeeds_on_third_attempt(r, spawn, broker):
    w = spawn(JOB_MODULES=MODULES)
    job_id = broker.push("flaky", ["fl", 2], {})
    done = events(r, "fl", 1, timeout=30)[0]
    assert (done["event"], done["attempt"]) == ("done", 3)
    wait_until(lambda: r.get("worker:stat:processed") == "1", 10, "the ack")
    assert r.get("fl:count") == "3"
    assert FailedRegistry(broker).count() == 0 and nothing_in_flight(r)
    assert w.output.count("event=job.retry ") == 2 and f"job={job_id}" in w.output


def test_always_failing_job_is_retried_with_backoff_then_recorded(r, spawn, broker):
    spawn(JOB_MODULES=MODULES)
    job_id = broker.push("nl_always_fails", ["af"], {})
    attempts = events(r, "af", 3, timeout=30)
    # backoff (base 2 s, jitter 0.5-1.0): retry 1 after 1-2 s, retry 2 after 2-4 s; lower bounds only (no sooner)
    gaps = [attempts[1]["t"] - attempts[0]["t"], attempts[2]["t"] - attempts[1]["t"]]
    assert gaps[0] >= 0.95 and gaps[1] >= 1.95, gaps
    reg = FailedRegistry(broker)
    wait_until(lambda: reg.count() == 1, 10, "the failure record")
    rec = reg.get(job_id)
    assert rec["attempts"] == 3 and rec["cause"] == "error" and rec["type"] == "RuntimeError"
    assert "always" in rec["message"] and "RuntimeError" in rec["traceback"]
    assert [h["cause"] for h in rec["history"]] == ["error"] * 3
    assert all(h["type"] == "RuntimeError" for h in rec["history"])
    assert json.loads(rec["payload"])["id"] == job_id
    assert nothing_in_flight(r) and r.llen("af") == 0, "no fourth attempt"
    assert r.get("worker:stat:failed") == "1"


def test_job_retries_env_sets_the_default(r, spawn, broker):
    spawn(JOB_MODULES=MODULES, JOB_RETRIES="1")
    job_id = broker.push("nl_boom", ["env retries"], {})
    reg = FailedRegistry(broker)
    wait_until(lambda: reg.count() == 1, 20, "the failure record")
    assert reg.get(job_id)["attempts"] == 2 and len(reg.get(job_id)["history"]) == 2


# --- delayed jobs ---

def test_enqueue_in_and_enqueue_at_run_no_sooner_than_asked(r, spawn, broker):
    t0 = time.time()
    worker.enqueue_in(2, "nl_stamp", "ev", "in")
    at = datetime.now(timezone.utc) + timedelta(seconds=2.5)
    worker.enqueue_at(at, "nl_stamp", "ev", "at")
    naive_utc = datetime.now(timezone.utc).replace(tzinfo=None) + timedelta(seconds=1.5)
    worker.enqueue_at(naive_utc, "nl_stamp", "ev", "naive")  # naive datetimes are UTC
    # No worker yet, so nothing can have moved them: all three are scheduled, at the times asked (an absolute
    # time to the ms; enqueue_in on the Redis clock, which the test cannot read at the same instant: bounded).
    assert r.llen(QUEUE) == 0
    due = {json.loads(p)["args"][1]: score for p, score in r.zrange("worker:scheduled", 0, -1, withscores=True)}
    assert set(due) == {"in", "at", "naive"}, due
    assert due["at"] == int(at.timestamp() * 1000)
    assert due["naive"] == int(naive_utc.replace(tzinfo=timezone.utc).timestamp() * 1000)
    assert t0 + 2 - 0.001 <= due["in"] / 1000 <= time.time() + 2.1, (t0, due)  # Redis runs on this machine (ms)
    spawn(JOB_MODULES=MODULES)
    ran = {e["tag"]: e["t"] for e in events(r, "ev", 3)}
    assert ran["naive"] >= t0 + 1.5 and ran["in"] >= t0 + 2 and ran["at"] >= t0 + 2.5, (t0, ran)
    assert max(ran.values()) < t0 + 15  # and it did not wait for something else (generous)
    wait_until(lambda: nothing_in_flight(r), 10, "the acks")


def test_cli_enqueue_in(r, spawn, cli):
    t0 = time.time()
    res = cli("enqueue", "nl_stamp", "--args", '["ev", "cli"]', "--in", "2", JOB_MODULES=MODULES)
    assert res.returncode == 0, res.stderr
    assert r.zcard("worker:scheduled") == 1 and r.llen(QUEUE) == 0  # no worker yet: it stays scheduled
    spawn(JOB_MODULES=MODULES)
    (ran,) = events(r, "ev", 1)
    assert ran["tag"] == "cli" and ran["t"] >= t0 + 2


def test_due_jobs_move_exactly_once_with_several_workers(r, spawn, broker):
    workers = [spawn(JOB_MODULES=MODULES) for _ in range(3)]
    wait_until(lambda: r.zcard("worker:workers") == 3, 20, "three workers")
    due = time.time() + 1.5  # all due in the same millisecond: every worker's claim cycle competes for them
    ids = [broker.push("push", ["out", str(i)], {}, due=due) for i in range(60)]
    assert r.zcard("worker:scheduled") == 60
    wait_until(lambda: int(r.get("worker:stat:processed") or 0) >= 60 and nothing_in_flight(r), 30, "60 jobs")
    assert sorted(r.lrange("out", 0, -1), key=int) == [str(i) for i in range(60)]
    assert r.get("worker:stat:processed") == "60"
    assert len(set(ids)) == 60 and all(w.popen.poll() is None for w in workers)


# --- the failed registry ---

def test_failed_registry_cli_and_api(r, spawn, cli, broker):
    ids = [broker.push("nl_fail_unless", ["flag", "out"], {}) for _ in range(3)]
    boom = broker.push("nl_boom", ["kaboom"], {})
    burst(spawn)
    reg = FailedRegistry(broker)
    assert reg.count() == 4

    res = cli("failed")
    assert res.returncode == 0 and "4 failed job(s)" in res.stdout
    assert all(i in res.stdout for i in ids + [boom]) and "nl_fail_unless" in res.stdout and "kaboom" in res.stdout
    doc = json.loads(cli("failed", "list", "--json", "--limit", "2").stdout)
    assert doc["count"] == 4 and [j["id"] for j in doc["jobs"]] == reg.ids(2)
    assert reg.ids()[0] == boom, "newest first"
    shown = cli("failed", "show", ids[0])
    rec = json.loads(shown.stdout)
    assert shown.returncode == 0 and rec["id"] == ids[0] and rec["cause"] == "error"
    assert rec["type"] == "RuntimeError" and "flag is not set" in rec["message"] and rec["traceback"]
    assert json.loads(rec["payload"])["name"] == "nl_fail_unless" and rec["attempts"] == 1
    assert cli("failed", "show", "nope").returncode == 1

    r.set("flag", 1)  # the bug is "fixed": retried jobs now succeed
    res = cli("failed", "retry", ids[0])
    assert res.returncode == 0 and "retried 1" in res.stdout
    assert json.loads(r.lindex(QUEUE, 0))["attempts"] == 0 and reg.get(ids[0]) is None
    assert cli("failed", "retry", "nope").returncode == 1
    assert cli("failed", "retry").returncode == 2  # neither an id nor --all
    assert reg.retry([ids[1], "nope"]) == [ids[1]]
    assert r.llen(QUEUE) == 2 and reg.count() == 2

    res = cli("failed", "remove", ids[2])
    assert res.returncode == 0 and "removed 1" in res.stdout and reg.get(ids[2]) is None
    assert cli("failed", "remove", "nope").returncode == 1
    res = cli("failed", "retry", "--all")
    assert res.returncode == 0 and "retried 1" in res.stdout and reg.count() == 0

    burst(spawn)
    assert r.lrange("out", 0, -1) == ["ok", "ok"]
    assert reg.ids() == [boom], "the retried boom failed again"
    assert reg.remove(["nope"]) == 0
    res = cli("failed", "remove", "--all")
    assert res.returncode == 0 and "removed 1" in res.stdout
    assert reg.count() == 0 and r.hlen("worker:failed:data") == 0 and nothing_in_flight(r)


def test_failed_max_keeps_the_newest(r, spawn, broker):
    ids = [broker.push("nl_boom", [f"m{i}"], {}) for i in range(8)]
    burst(spawn, FAILED_MAX="5")
    reg = FailedRegistry(broker)
    assert reg.count() == 5 and r.hlen("worker:failed:data") == 5
    assert reg.ids() == ids[:2:-1], "the 5 newest, newest first"
    assert r.get("worker:stat:failed") == "8"


def test_failed_ttl_trims_old_records(r, spawn, broker):
    old = broker.push("nl_boom", ["old"], {})
    burst(spawn, FAILED_TTL="1")
    reg = FailedRegistry(broker)
    assert reg.ids() == [old]
    # The TTL is the behaviour under test: let it pass on the Redis clock, then the next failure trims.
    failed_at = r.zscore("worker:failed", old)
    wait_until(lambda: (lambda s, us: s * 1000 + us // 1000)(*r.time()) > failed_at + 1100, 5, "the TTL")
    new = broker.push("nl_boom", ["new"], {})
    burst(spawn, FAILED_TTL="1")
    assert reg.ids() == [new] and r.hlen("worker:failed:data") == 1


# --- graceful put-back ---

@pytest.mark.parametrize("name,attempts", [("nl_hang", 0), ("nl_fail_then_hang", 1)])
def test_graceful_put_back_does_not_count_as_an_attempt(r, spawn, broker, name, attempts):
    """SIGTERM interrupts the job; it goes back to the head of its queue with its attempts unchanged (0 for a
    fresh job, 1 for a job already failed once and now on its retry)."""
    w = spawn(JOB_MODULES=MODULES, SHUTDOWN_WINDOW="4")
    job_id = broker.push(name, ["ev"], {})
    started = events(r, "ev", 1 + attempts, timeout=20)
    assert started[-1]["event"] == "started"
    w.signal(signal.SIGTERM)
    assert w.wait(10) == 0, w.output
    assert r.llen(QUEUE) == 1
    doc = json.loads(r.lindex(QUEUE, 0))
    assert doc["id"] == job_id and doc["attempts"] == attempts
    assert len(doc.get("errors") or []) == attempts
    assert r.zcard("worker:scheduled") == 0 and r.zcard("worker:failed") == 0
    assert not any(r.llen(k) for k in r.keys("worker:processing:*"))


# --- wrong-typed bookkeeping keys (issue 27 item 1) ---

@pytest.mark.timeout(60)
@pytest.mark.parametrize("key,retries", [("worker:scheduled", 1), ("worker:failed", 0), ("worker:failed:data", 0)])
def test_a_wrong_typed_key_an_outcome_needs_keeps_the_job_claimed_until_it_is_fixed(r, spawn, broker, key, retries):
    """Issue 27 item 1: CYCLE removed the claim (LREM) and then raised on a wrong-typed P:scheduled (a retry due),
    P:failed or P:failed:data (a failure): the job was in no list, and the log said ``redis.unavailable``. Now the
    call writes nothing, the outcome waits with the job still claimed, the log names the key and its type, and the
    outcome lands once the key is repaired."""
    r.set(key, "junk")
    job_id = worker.enqueue("fail", "boom")
    w = spawn(JOB_MODULES=MODULES, JOB_RETRIES=str(retries), HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="3")
    event = "job.retry" if retries else "job.failed"
    w.wait_for(rf"event={event} ", 20)
    wait_until(lambda: re.search(rf"event=redis\.wrong_type key={key} type=string",
                                 w.output.split(f"event={event} ", 1)[1]), 10, "the key named after the outcome")
    assert "redis.unavailable" not in w.output
    held = [p for k in r.keys("worker:processing:*") for p in r.lrange(k, 0, -1)]
    assert [worker.jobs.loose_id(p) for p in held] == [job_id], w.output  # still claimed: nothing lost
    r.delete(key)
    if retries:
        wait_until(lambda: r.zcard("worker:scheduled") == 1, 10, "the retry to land once the key is repaired")
        assert json.loads(r.zrange("worker:scheduled", 0, 0)[0])["id"] == job_id
    else:
        wait_until(lambda: r.hexists("worker:failed:data", job_id), 10, "the failure record once repaired")
    w.signal(signal.SIGTERM)
    assert w.wait(15) == 0, w.output


@pytest.mark.timeout(60)
def test_a_retry_of_a_job_near_the_size_limit_runs(r, spawn):
    """Issue 27 item 3: a payload near MAX_PAYLOAD_BYTES grew past it with its retry's error history and the retry
    was refused as a bad payload; what the runtime adds never turns an accepted job into a failed one."""
    limit = 1000
    b = Broker(r, worker.config.from_mapping({"MAX_PAYLOAD_BYTES": str(limit)}))
    key = "fl" + "x" * 850
    b.push("flaky", [key, 1], {})
    assert len(r.lindex(QUEUE, 0)) > limit - 100
    w = spawn(JOB_MODULES=MODULES, MAX_PAYLOAD_BYTES=str(limit))
    (done,) = events(r, key, 1)
    assert done["attempt"] == 2, w.output
    assert "event=job.bad" not in w.output


@pytest.mark.timeout(60)
@pytest.mark.parametrize("field", [None, "default"])
def test_a_retry_goes_back_to_the_queue_it_was_claimed_from(r, spawn, field):
    """Issue 27 item 6: a raw payload without a ``queue`` field (or naming another queue) pushed to ``mail`` retried
    into ``default``, which a ``QUEUES=mail`` worker never serves."""
    doc = {"id": f"mq{field}", "name": "flaky", "args": ["mq", 1], "kwargs": {}}
    if field:
        doc["queue"] = field
    r.rpush("worker:queue:mail", json.dumps(doc))
    w = spawn(JOB_MODULES=MODULES, QUEUES="mail")
    (done,) = events(r, "mq", 1)
    assert done["attempt"] == 2, w.output


# --- rolling deploys: a job name this worker does not register (issue 21 item 6) ---

@pytest.mark.timeout(60)
def test_a_job_name_not_registered_yet_is_put_back_until_a_worker_knows_it(r, spawn):
    """Issue 21 item 6: a new web dyno enqueues a job the old worker dyno does not know yet. It is put back (through
    the schedule, not counted as an attempt) and runs once a worker that registers it takes it."""
    doc = {"id": "deploy1", "name": "nl_stamp", "queue": "default", "args": ["deployed", "t"], "kwargs": {},
           "attempts": 0}
    r.rpush(QUEUE, json.dumps(doc))
    old = spawn(JOB_MODULES="worker.sample,tests.jobs")  # the old code: no tests.jobs_chaos, so no nl_stamp
    old.wait_for(r"event=job\.unknown_name .*name=nl_stamp", 15)
    old.signal(signal.SIGTERM)
    assert old.wait(15) == 0, old.output
    assert r.zcard("worker:failed") == 0
    back = json.loads(r.zrange("worker:scheduled", 0, 0)[0])
    assert back["id"] == "deploy1" and back["attempts"] == 0 and back["unknown_since"] > 0
    assert r.hget("worker:job:deploy1", "status") in (None, "scheduled")
    new = spawn(JOB_MODULES=MODULES)  # the new code
    wait_until(lambda: r.hget("worker:job:deploy1", "status") == "done", 20, "the job to run on the new worker")
    new.signal(signal.SIGTERM)
    assert new.wait(15) == 0, new.output


@pytest.mark.timeout(60)
def test_a_job_name_never_registered_is_failed_after_the_grace_with_its_name(r, spawn):
    """Issue 21 item 6: past UNKNOWN_JOB_GRACE the job is failed, and its failed record keeps its name (it was
    empty); the retries come at most 30 s apart (here: every second or so, as the wait grows)."""
    r.rpush(QUEUE, json.dumps({"id": "deploy2", "name": "never_deployed", "queue": "default", "args": [],
                               "kwargs": {}}))
    w = spawn(JOB_MODULES=MODULES, UNKNOWN_JOB_GRACE="2")
    wait_until(lambda: r.hexists("worker:failed:data", "deploy2"), 20, "the failure once the grace is over")
    rec = json.loads(r.hget("worker:failed:data", "deploy2"))
    assert rec["name"] == "never_deployed" and rec["cause"] == "bad_payload", rec
    assert "not registered" in rec["message"] and "UNKNOWN_JOB_GRACE" in rec["message"]
    assert w.output.count("event=job.unknown_name") >= 2, w.output
    w.signal(signal.SIGTERM)
    assert w.wait(15) == 0, w.output


@pytest.mark.timeout(60)
def test_an_unparseable_payload_still_fails_at_once(r, spawn):
    """Issue 21 item 6: only a readable payload with an unknown name gets the grace; one that cannot be parsed fails
    at its first claim."""
    r.rpush(QUEUE, "not json at all")
    w = spawn("--burst", JOB_MODULES=MODULES)
    assert w.wait(30) == 0, w.output
    assert r.zcard("worker:failed") == 1 and r.zcard("worker:scheduled") == 0


# --- the failed registry: --limit, and messages a strict stdout cannot encode ---

def _store_failed(r, n=3, message="boom"):
    for i in range(n):
        rec = {"id": f"f{i}", "name": "push", "queue": "default", "payload": job_json(f"f{i}"), "cause": "error",
               "type": "ValueError", "message": message, "traceback": "", "worker": "w", "attempts": 1,
               "failed_at": time.time(), "history": []}
        r.zadd("worker:failed", {f"f{i}": time.time() * 1000 + i})  # now: older records are past FAILED_TTL
        r.hset("worker:failed:data", f"f{i}", json.dumps(rec))


def test_failed_limit_zero_and_negative(r, cli):
    """Origin: issue 10, adversarial review #8."""
    _store_failed(r, 3)
    out = cli("failed", "--json", "--limit", "0")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["jobs"] == []
    out = cli("failed", "--json", "--limit", "2")
    assert [j["id"] for j in json.loads(out.stdout)["jobs"]] == ["f2", "f1"]
    out = cli("failed", "--limit", "-1")
    assert out.returncode == 2 and "--limit" in out.stderr, (out.stdout, out.stderr)
    reg = FailedRegistry(make_broker(r))
    assert reg.list(0) == [] and reg.ids(0) == []
    with pytest.raises(ValueError):
        reg.list(-1)


def test_failed_list_with_a_surrogate_message_on_strict_utf8_stdout(r, cli):
    """Origin: issue 10, adversarial review #8."""
    _store_failed(r, 1)
    rec = json.loads(r.hget("worker:failed:data", "f0"))
    rec["message"] = "cannot open caf\udce9.txt"
    r.hset("worker:failed:data", "f0", json.dumps(rec))
    out = cli("failed", PYTHONIOENCODING="utf-8:strict")
    assert out.returncode == 0, out.stderr
    assert "caf\\udce9.txt" in out.stdout


@pytest.mark.timeout(60)
def test_dont_retry_and_retry_on_decide_in_the_child(r, broker, spawn):
    """Issue 24 item 6: @job(retries=1, dont_retry=(ValueError,)) fails a ValueError subclass at once and retries
    anything else; @job(retries=1, retry_on=(IOError,)) retries an OSError subclass and fails anything else at once.
    The child decides (the app's classes are not in the worker) and says so in its report."""
    import tests.jobs_retry  # noqa: F401
    ids = {(name, kind): worker.enqueue(name, f"ev:{name}:{kind}", kind)
           for name in ("rt_dont", "rt_only") for kind in ("value", "io")}
    w = spawn(JOB_MODULES=MODULES + ",tests.jobs_retry", LOG_LEVEL="INFO")
    wait_until(lambda: all(worker.get_job(i).status == "failed" for i in ids.values()), 30, "every job failed")
    runs = {key: len(r.lrange(f"ev:{key[0]}:{key[1]}", 0, -1)) for key in ids}
    assert runs == {("rt_dont", "value"): 1, ("rt_dont", "io"): 2, ("rt_only", "value"): 1, ("rt_only", "io"): 2}
    reg = FailedRegistry(broker)
    for key, job_id in ids.items():
        rec = reg.get(job_id)
        assert rec is not None, key
        assert rec.get("retryable", True) is (runs[key] == 2), (key, rec)
        assert worker.get_job(job_id).attempts == runs[key]
    assert len(re.findall(r"event=job\.failed .*retryable=False", w.output)) == 2, w.output
    w.signal(signal.SIGTERM)
    assert w.wait(15) == 0


def test_dont_retry_and_retry_on_are_checked_at_decoration():
    """Issue 24 item 6: both at once, or something other than exception classes, is a TypeError at decoration."""
    from worker import job
    with pytest.raises(TypeError, match="not both"):
        job(retries=2, dont_retry=(ValueError,), retry_on=(IOError,))
    for bad in ((ValueError, "x"), [ValueError], ("ValueError",), (int,)):
        with pytest.raises(TypeError, match="tuple of exception classes"):
            job(dont_retry=bad)
        with pytest.raises(TypeError, match="tuple of exception classes"):
            job(retry_on=bad)
    with pytest.raises(TypeError, match="retry nothing"):
        job(retry_on=())
    spec_fn = job(name="rt_single", dont_retry=KeyError)(lambda: None)
    assert worker.jobs.registered(spec_fn.job_name).dont_retry == (KeyError,)
