"""Crash recovery: a job claimed by a worker that vanishes (SIGKILL of the whole tree, like a dyno crash) is put
back and run by another worker; recovery is atomic under concurrency; a live worker's job is never stolen; a job
whose worker keeps vanishing ends in the failed registry (MAX_ATTEMPTS) with its history.

Delivery is at-least-once: a recovered job may run twice, but it must never disappear.
"""
from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import pytest
import redis

import worker.config
import worker.jobs
from worker.failed import FailedRegistry
from worker.fetch import Broker

from tests.support import seen_late_long_ago, wait_until

from .conftest import PYTHON, REPO

MODULES = "worker.sample,tests.jobs,tests.jobs_chaos"
FAST = {"HEARTBEAT_INTERVAL": "0.5", "HEARTBEAT_TTL": "2", "JOB_MODULES": MODULES}
WORKERS = "worker:workers"


def _url(r) -> str:
    kw = r.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}"


def broker_for(url, **env) -> Broker:
    cfg = worker.config.from_mapping({"REDIS_URL": url, **env})
    return Broker(redis.Redis.from_url(url, decode_responses=True), cfg)


def blpop(r, key, timeout):
    """BLPOP in slices: one BLPOP must stay under the client's socket timeout (5 s by default)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        got = r.blpop(key, min(2.0, max(0.01, left)))
        if got is not None:
            return got
    return None


def next_event(r, key, timeout=20.0) -> dict:
    got = blpop(r, key, timeout)
    assert got is not None, f"no event on {key!r} within {timeout}s"
    return json.loads(got[1])


def redis_ms(r) -> int:
    sec, usec = r.time()
    return sec * 1000 + usec // 1000


def live_processing(r) -> dict:
    """Processing lists that still hold something (the only place an in-flight job can be)."""
    return {k: r.lrange(k, 0, -1) for k in r.keys("worker:processing:*") if r.llen(k)}


def test_worker_name_includes_dyno(r, spawn):
    w = spawn(DYNO="worker.7", **FAST)
    wait_until(lambda: r.zrange(WORKERS, 0, -1), 15, "the worker's heartbeat")
    assert r.zrange(WORKERS, 0, -1) == [f"worker.7:{w.pid}"]
    assert r.hget(f"worker:worker:worker.7:{w.pid}", "dyno") == "worker.7"
    w.wait_for(rf"worker=worker\.7:{w.pid}\b")


def test_sigkilled_worker_job_runs_on_a_live_worker(r, spawn):
    """B is already running and idle when A dies: recovery must come from B's periodic check, not its start-up."""
    a = spawn(DYNO="worker.1", **FAST)
    job_id = broker_for(_url(r)).push("nl_hang_first", ["ev"], {})
    first = next_event(r, "ev")
    assert (first["event"], first["run"]) == ("started", 1)
    assert f"worker:processing:worker.1:{a.pid}" in live_processing(r)

    b = spawn(DYNO="worker.2", **FAST)
    wait_until(lambda: r.zscore(WORKERS, f"worker.2:{b.pid}") is not None, 15, "worker B registered")
    b.wait_for(r"event=worker.start")
    killed_at = time.monotonic()
    a.kill_tree()  # dyno crash: parent and child SIGKILLed, nothing gets to run a handler

    again = next_event(r, "ev", timeout=30)
    took = time.monotonic() - killed_at
    print(f"\nrecovery with HEARTBEAT_INTERVAL=0.5 HEARTBEAT_TTL=2: job running again {took:.2f}s after SIGKILL")
    assert (again["event"], again["run"]) == ("started", 2)
    assert next_event(r, "ev")["event"] == "done"
    b.wait_for(rf"event=recovery\.requeued job={job_id}")
    wait_until(lambda: live_processing(r) == {}, 10, "the recovered job's ack")
    assert r.zscore(WORKERS, f"worker.1:{a.pid}") is None
    assert not r.exists(f"worker:processing:worker.1:{a.pid}", f"worker:worker:worker.1:{a.pid}")
    assert r.llen("worker:queue:default") == 0
    assert r.get("ev:runs") == "2"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dead", ["deadline", "legacy"])
def test_burst_worker_recovers_a_dead_workers_job_at_start_up(r, spawn, dead):
    """A --burst worker started beside a dead worker's processing list runs the recoverable job before it exits:
    recovery happens at start-up, before the first claim, not only on the periodic pass (which a burst worker
    that finds its queues empty never reaches). Dead means its P:workers score, a deadline it wrote itself, is
    in the past (its hash has ``ttl``), or, for a worker of an older version (no ``ttl``: its score was its last
    beat), that score is older than our own HEARTBEAT_TTL."""
    name = "worker.9:4242"
    if dead == "deadline":
        r.zadd(WORKERS, {name: redis_ms(r) - 1000})
        r.hset(f"worker:worker:{name}", mapping={"ttl": 2000, "state": "busy"})
    else:
        r.zadd(WORKERS, {name: redis_ms(r) - 3_600_000})
        r.hset(f"worker:worker:{name}", mapping={"state": "busy"})
    job = json.dumps({"id": "orphan", "name": "push", "queue": "default", "args": ["out", "recovered"],
                      "kwargs": {}, "attempts": 0})
    r.rpush(f"worker:processing:{name}", job)
    w = spawn("--burst", **FAST)
    assert w.wait(30) == 0, w.output
    assert r.lrange("out", 0, -1) == ["recovered"], w.output
    assert "event=recovery.requeued job=orphan" in w.output
    assert live_processing(r) == {} and r.llen("worker:queue:default") == 0
    assert r.zscore(WORKERS, name) is None and not r.exists(f"worker:worker:{name}")


@pytest.mark.slow
@pytest.mark.timeout(110)
def test_recovery_time_with_default_heartbeat_settings(r, spawn):
    """Defaults (HEARTBEAT_INTERVAL=5, HEARTBEAT_TTL=30): the job is back HEARTBEAT_TTL after the dead worker's last
    beat (at most one interval before the kill), plus up to 2 x INTERVAL until a live worker's next recovery pass:
    25-40 s. Measured and printed; the assertion is only the issue's 60 s."""
    defaults = {"JOB_MODULES": MODULES}
    a = spawn(**defaults)
    broker_for(_url(r)).push("nl_hang_first", ["ev"], {})
    assert next_event(r, "ev")["run"] == 1
    b = spawn(**defaults)
    wait_until(lambda: r.zscore(WORKERS, f"{socket.gethostname()}:{b.pid}") is not None, 15, "worker B registered")
    killed_at = time.monotonic()
    a.kill_tree()
    got = blpop(r, "ev", 60)
    took = time.monotonic() - killed_at
    print("\nrecovery with default heartbeat settings: "
          + (f"job running again {took:.1f}s after SIGKILL" if got else f"NOT recovered within {took:.0f}s"))
    assert got is not None, f"job not recovered within 60 s of the SIGKILL; worker B output:\n{b.output}"
    assert json.loads(got[1])["run"] == 2


def _dead_worker(r, name, n, key):
    """A worker that claimed ``n`` jobs and stopped heartbeating 10 s ago (its process is long gone)."""
    cfg = worker.config.from_mapping({})
    payloads = [worker.jobs.build_payload("push", [key, i], {}, None, cfg.max_payload)[2] for i in range(n)]
    r.rpush(f"worker:processing:{name}", *payloads)
    r.zadd(WORKERS, {name: redis_ms(r) - 10_000})
    r.hset(f"worker:worker:{name}", mapping={"state": "busy"})
    seen_late_long_ago(r, name)  # and seen late by a recovery pass long ago: the next pass finds it dead
    return [json.loads(p)["id"] for p in payloads]


def _assert_requeued_once(r, name, ids, results):
    queued = [json.loads(p) for p in r.lrange("worker:queue:default", 0, -1)]
    assert sorted(d["id"] for d in queued) == sorted(ids), "each job back in its queue exactly once"
    assert all(d["attempts"] == 1 and d["errors"][-1]["cause"] == "lost" and d["errors"][-1]["worker"] == name
               for d in queued)
    reported = [item for res in results for item in res]
    assert sorted(reported) == sorted(f"requeued:{i}" for i in ids), "one recoverer reports each job"
    assert not r.exists(f"worker:processing:{name}", f"worker:worker:{name}")
    assert r.zscore(WORKERS, name) is None


def test_concurrent_recovery_from_threads_requeues_once(r):
    url = _url(r)
    for round_ in range(10):
        r.delete("worker:queue:default")
        name = f"dead.{round_}:4242"
        ids = _dead_worker(r, name, 5, "out")
        brokers = [broker_for(url, **FAST) for _ in range(16)]
        barrier = threading.Barrier(len(brokers))
        results = [None] * len(brokers)

        def recover(i):
            barrier.wait()
            results[i] = brokers[i].recover(skip=f"thread:{i}")

        threads = [threading.Thread(target=recover, args=(i,)) for i in range(len(brokers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert all(res is not None for res in results)
        _assert_requeued_once(r, name, ids, results)


_RECOVER_PROC = r"""
import json, sys, redis, worker.config
from worker.fetch import Broker
url, me = sys.argv[1], sys.argv[2]
c = redis.Redis.from_url(url, decode_responses=True)
b = Broker(c, worker.config.from_mapping({"REDIS_URL": url, "HEARTBEAT_INTERVAL": "0.5", "HEARTBEAT_TTL": "2"}))
c.rpush("ready", me)
while not c.blpop("go:" + me, 2):  # sliced under the socket timeout
    pass
print(json.dumps(b.recover(skip=me)))
"""


def test_concurrent_recovery_from_processes_requeues_once(r, env):
    name = "dead.proc:4343"
    ids = _dead_worker(r, name, 20, "out")
    procs = [subprocess.Popen([PYTHON, "-c", _RECOVER_PROC, _url(r), f"p{i}"], env=env, cwd=str(REPO),
                              stdout=subprocess.PIPE, text=True) for i in range(6)]
    try:
        for _ in procs:  # every process connected and waiting, then released together
            assert blpop(r, "ready", 30) is not None
        with r.pipeline() as pipe:
            for i in range(len(procs)):
                pipe.rpush(f"go:p{i}", 1)
            pipe.execute()
        results = [json.loads(p.communicate(timeout=30)[0]) for p in procs]
    finally:
        for p in procs:
            p.kill()
    _assert_requeued_once(r, name, ids, results)


@pytest.mark.parametrize("interval,ttl", [("0.5", "2"), ("0.25", "1")])
def test_live_busy_worker_job_is_never_stolen(r, spawn, interval, ttl):
    """A job running longer than HEARTBEAT_TTL on a live worker: other workers start (and recover) and the test
    itself runs recovery every 50 ms; the job runs once. The second case has heartbeats well under a second (the
    busy loop must beat that often, not once per second), with a TTL kept at 1 s for CPU-contention margin."""
    hb = {"HEARTBEAT_INTERVAL": interval, "HEARTBEAT_TTL": ttl, "JOB_MODULES": MODULES}
    a = spawn(**hb)
    a_name = f"{socket.gethostname()}:{a.pid}"
    job_seconds = max(5.0, 3 * float(ttl))
    broker_for(_url(r)).push("nl_hang_first", ["ev", job_seconds], {})
    assert next_event(r, "ev")["run"] == 1
    others = [spawn(**hb) for _ in range(2)]
    recoverer = broker_for(_url(r), HEARTBEAT_INTERVAL=interval, HEARTBEAT_TTL=ttl)
    deadline = time.monotonic() + job_seconds + 15
    while r.llen("ev") == 0:
        assert time.monotonic() < deadline, "the job never finished"
        assert recoverer.recover(skip="test") == [], "a live worker's job was taken"
        time.sleep(0.05)
    done = next_event(r, "ev")
    assert (done["event"], done["run"]) == ("done", 1)
    wait_until(lambda: r.get("worker:stat:processed") == "1", 10, "the ack")
    assert r.get("ev:runs") == "1", "the job ran more than once"
    assert r.llen("worker:queue:default") == 0 and live_processing(r) == {}
    for w in [a] + others:
        assert "event=recovery." not in w.output, w.output
    assert r.zscore(WORKERS, a_name) is not None


@pytest.mark.timeout(90)
def test_job_whose_worker_keeps_vanishing_goes_to_failed(r, spawn):
    """MAX_ATTEMPTS=3: three workers die running it; the fourth worker's recovery records it as failed ("lost")
    with a 3-entry history instead of running it again. Each replacement starts once the dead worker's heartbeat
    has expired (a crashed dyno takes a while to come back) and recovers at start-up."""
    hb = dict(FAST, MAX_ATTEMPTS="3")
    reg = FailedRegistry(broker_for(_url(r)))
    job_id = broker_for(_url(r)).push("nl_hang", ["ev"], {})
    dead = []
    for _ in range(3):
        w = spawn(**hb)
        assert next_event(r, "ev")["event"] == "started"
        name = f"{socket.gethostname()}:{w.pid}"
        w.kill_tree()
        dead.append(name)
        wait_until(lambda: (r.zscore(WORKERS, name) or 0) < redis_ms(r) - 2100, 10, "heartbeat expiry")
    last = spawn(**hb)
    last.wait_for(rf"event=recovery\.failed job={job_id}")
    rec = reg.get(job_id)
    assert rec is not None and rec["cause"] == "lost" and rec["type"] == "WorkerLost"
    assert rec["attempts"] == 3
    assert [h["cause"] for h in rec["history"]] == ["lost"] * 3
    assert [h["worker"] for h in rec["history"]] == dead
    assert json.loads(rec["payload"])["id"] == job_id
    assert r.llen("ev") == 0, "the poison job ran a fourth time"
    assert r.llen("worker:queue:default") == 0 and live_processing(r) == {}
    assert reg.count() == 1
