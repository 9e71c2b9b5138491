"""Crash recovery: a job claimed by a worker that vanishes (SIGKILL of the whole tree, like a dyno crash) is put
back and run by another worker; recovery is atomic under concurrency; a live worker's job is never stolen; a job
whose worker keeps vanishing ends in the failed registry (MAX_ATTEMPTS) with its history.

Liveness is judged per worker (its own HEARTBEAT_TTL, a grace from the first sighting of a late beat), so Redis stalls
past a TTL and workers with different heartbeat settings never make a live job run twice; and the recovery script
survives hostile payloads and wrong-typed keys (nothing after its first write may raise).

Delivery is at-least-once: a recovered job may run twice, but it must never disappear.
"""
from __future__ import annotations

import json
import os
import re
import signal
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

from tests import dyno
from tests.support import (assert_ran_once, client_pause, count, home, job_json, keys_of, make_broker, name_of,
                           new_broker, next_event, processing, queued_loose_ids, redis_ms, seen_late_long_ago,
                           url_of, wait_event,
                           wait_until)
from worker import jobs as worker_jobs
from worker.config import from_mapping
from worker.log import _value

from .conftest import PYTHON, REPO

MODULES = "worker.sample,tests.jobs,tests.jobs_chaos"
FAST = {"HEARTBEAT_INTERVAL": "0.5", "HEARTBEAT_TTL": "2", "JOB_MODULES": MODULES}
TERM_MODULES = "worker.sample,tests.jobs,tests.jobs_term"
pytestmark = pytest.mark.both_backends  # each test on the single redis-server and on the local Redis Cluster


def blpop(r, key, timeout):
    """BLPOP in slices: one BLPOP must stay under the client's socket timeout (5 s by default)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        got = r.blpop(key, min(2.0, max(0.01, left)))
        if got is not None:
            return got
    return None


def test_worker_name_includes_dyno(r, k, spawn):
    w = spawn(DYNO="worker.7", **FAST)
    wait_until(lambda: r.zrange(k.workers, 0, -1), 15, "the worker's heartbeat")
    assert r.zrange(k.workers, 0, -1) == [f"worker.7:{w.pid}"]
    assert r.hget(k.worker(f"worker.7:{w.pid}"), "dyno") == "worker.7"
    w.wait_for(rf"worker=worker\.7:{w.pid}\b")


def test_sigkilled_worker_job_runs_on_a_live_worker(r, k, spawn):
    """B is already running and idle when A dies: recovery must come from B's periodic check, not its start-up."""
    a = spawn(DYNO="worker.1", **FAST)
    job_id = make_broker(r).push("nl_hang_first", ["ev"], {})
    first = next_event(r, "ev")
    assert (first["event"], first["run"]) == ("started", 1)
    assert k.processing(f"worker.1:{a.pid}") in processing(r)

    b = spawn(DYNO="worker.2", **FAST)
    wait_until(lambda: r.zscore(k.workers, f"worker.2:{b.pid}") is not None, 15, "worker B registered")
    b.wait_for(r"event=worker.start")
    killed_at = time.monotonic()
    a.kill_tree()  # dyno crash: parent and child SIGKILLed, nothing gets to run a handler

    again = next_event(r, "ev", timeout=30)
    took = time.monotonic() - killed_at
    print(f"\nrecovery with HEARTBEAT_INTERVAL=0.5 HEARTBEAT_TTL=2: job running again {took:.2f}s after SIGKILL")
    assert (again["event"], again["run"]) == ("started", 2)
    assert next_event(r, "ev")["event"] == "done"
    b.wait_for(rf"event=recovery\.requeued job={job_id}")
    wait_until(lambda: processing(r) == {}, 10, "the recovered job's ack")
    assert r.zscore(k.workers, f"worker.1:{a.pid}") is None
    assert not r.exists(k.processing(f"worker.1:{a.pid}"), k.worker(f"worker.1:{a.pid}"))
    assert r.llen(k.queue("default")) == 0
    assert r.get("ev:runs") == "2"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dead", ["deadline", "legacy"])
def test_burst_worker_recovers_a_dead_workers_job_at_start_up(r, k, spawn, dead):
    """A --burst worker started beside a dead worker's processing list runs the recoverable job before it exits:
    recovery happens at start-up, before the first claim, not only on the periodic pass (which a burst worker
    that finds its queues empty never reaches). Dead means its P:workers score, a deadline it wrote itself, is
    in the past (its hash has ``ttl``), or, for a worker of an older version (no ``ttl``: its score was its last
    beat), that score is older than our own HEARTBEAT_TTL."""
    name = "worker.9:4242"
    if dead == "deadline":
        r.zadd(k.workers, {name: redis_ms(r) - 1000})
        r.hset(k.worker(name), mapping={"ttl": 2000, "state": "busy"})
    else:
        r.zadd(k.workers, {name: redis_ms(r) - 3_600_000})
        r.hset(k.worker(name), mapping={"state": "busy"})
    job = json.dumps({"id": "orphan", "name": "push", "queue": "default", "args": ["out", "recovered"],
                      "kwargs": {}, "attempts": 0})
    r.rpush(k.processing(name), job)
    w = spawn("--burst", **FAST)
    assert w.wait(30) == 0, w.output
    assert r.lrange("out", 0, -1) == ["recovered"], w.output
    assert "event=recovery.requeued job=orphan" in w.output
    assert processing(r) == {} and r.llen(k.queue("default")) == 0
    assert r.zscore(k.workers, name) is None and not r.exists(k.worker(name))


@pytest.mark.timeout(30)
def test_a_stall_far_longer_than_ttl_and_grace_still_gets_its_grace_from_the_first_sighting(r, k):
    """Issue 27 item 12: "however long the stall". A worker whose deadline passed an hour ago, but that no recovery
    pass has seen late yet (Redis, or every worker, was stalled too), is only marked late by the first pass: nothing
    is recovered until its own interval + 1 s after that sighting, when a pass finds it dead."""
    name = "stalled.long:4242"
    job = worker.jobs.build_payload("push", ["out", 1], {}, None, worker.config.from_mapping({}).max_payload)[2]
    r.rpush(k.processing(name), job)
    r.zadd(k.workers, {name: redis_ms(r) - 3_600_000})  # its deadline: an hour ago
    r.hset(k.worker(name), mapping={"state": "busy", "ttl": 2000, "interval": 500})
    b = make_broker(r, **FAST)
    seen_at = redis_ms(r)
    first = b.recover(skip="test")
    assert list(first) == [] and first.wait is not None and 1.3 <= first.wait <= 1.5, (list(first), first.wait)
    assert r.lrange(k.processing(name), 0, -1) == [job], "recovered at its first sighting"
    got, at = [], 0
    deadline = time.monotonic() + 10
    while not got:
        assert time.monotonic() < deadline, "never recovered after its grace"
        time.sleep(0.05)
        at = redis_ms(r)
        got = list(b.recover(skip="test"))
    assert got == [f"requeued:{json.loads(job)['id']}"]
    assert at - seen_at >= 1500 - 5, f"recovered {at - seen_at} ms after the first sighting, before its grace"
    assert r.zscore(k.workers, name) is None and r.llen(k.queue("default")) == 1


@pytest.mark.timeout(60)
def test_recovery_puts_a_dead_workers_job_back_at_the_head_of_its_queue(r, k, spawn):
    """Issue 27 item 16: a recovered job goes back to the head of its queue (fetch.py), ahead of a job already
    queued there, and runs first. Every other recovery test starts from an empty queue."""
    make_broker(r).push("push", ["out", "queued"], {})
    [lost] = _dead_worker(r, "worker.8:4242", 1, "out")
    assert list(make_broker(r, **FAST).recover(skip="test")) == [f"requeued:{lost}"]
    assert [json.loads(p)["id"] for p in r.lrange(k.queue("default"), 0, -1)][0] == lost
    w = spawn("--burst", **FAST)
    assert w.wait(30) == 0, w.output
    assert r.lrange("out", 0, -1) == ["0", "queued"], w.output


@pytest.mark.slow
@pytest.mark.timeout(110)
@pytest.mark.single_backend("40 s of CI for a timing printed, not asserted (the 60 s bound); the recovery rule it "
                            "times runs on the cluster in every fast-heartbeat test of this file")
def test_recovery_time_with_default_heartbeat_settings(r, k, spawn):
    """Defaults (HEARTBEAT_INTERVAL=5, HEARTBEAT_TTL=30): the job is back HEARTBEAT_TTL after the dead worker's last
    beat (at most one interval before the kill), plus up to 2 x INTERVAL until a live worker's next recovery pass:
    25-40 s. Measured and printed; the assertion is only the issue's 60 s."""
    defaults = {"JOB_MODULES": MODULES}
    a = spawn(**defaults)
    make_broker(r).push("nl_hang_first", ["ev"], {})
    assert next_event(r, "ev")["run"] == 1
    b = spawn(**defaults)
    wait_until(lambda: r.zscore(k.workers, f"{socket.gethostname()}:{b.pid}") is not None, 15, "worker B registered")
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
    k = keys_of(r)
    cfg = worker.config.from_mapping({})
    payloads = [worker.jobs.build_payload("push", [key, i], {}, None, cfg.max_payload)[2] for i in range(n)]
    r.rpush(k.processing(name), *payloads)
    r.zadd(k.workers, {name: redis_ms(r) - 10_000})
    r.hset(k.worker(name), mapping={"state": "busy"})
    seen_late_long_ago(r, name)  # and seen late by a recovery pass long ago: the next pass finds it dead
    return [json.loads(p)["id"] for p in payloads]


def _assert_requeued_once(r, name, ids, results):
    k = keys_of(r)
    queued = [json.loads(p) for p in r.lrange(k.queue("default"), 0, -1)]
    assert sorted(d["id"] for d in queued) == sorted(ids), "each job back in its queue exactly once"
    assert all(d["attempts"] == 1 and d["errors"][-1]["cause"] == "lost" and d["errors"][-1]["worker"] == name
               for d in queued)
    reported = [item for res in results for item in res]
    assert sorted(reported) == sorted(f"requeued:{i}" for i in ids), "one recoverer reports each job"
    assert not r.exists(k.processing(name), k.worker(name))
    assert r.zscore(k.workers, name) is None


def test_concurrent_recovery_from_threads_requeues_once(r, k):
    # 16 recoverers, each on a connection of its own, made once (a cluster client's start-up costs ~0.1 s)
    brokers = [new_broker(r, **FAST) for _ in range(16)]
    for round_ in range(10):
        r.delete(k.queue("default"))
        name = f"dead.{round_}:4242"
        ids = _dead_worker(r, name, 5, "out")
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
    for b in brokers:
        b.r.close()


_RECOVER_PROC = r"""
import json, os, sys, worker.config
from tests.support import client_for
from worker.fetch import Broker
me = sys.argv[1]
cfg = worker.config.from_mapping({**os.environ, "HEARTBEAT_INTERVAL": "0.5", "HEARTBEAT_TTL": "2"})
c = client_for(cfg)  # REDIS_URL and REDIS_CLUSTER from the test's env
b = Broker(c, cfg)
c.rpush(b.keys.prefix + ":ready", me)  # (in the key space's slot: the test releases them in one pipeline)
while not c.blpop(b.keys.prefix + ":go:" + me, 2):  # sliced under the socket timeout
    pass
print(json.dumps(b.recover(skip=me)))
"""


def test_concurrent_recovery_from_processes_requeues_once(r, k, env):
    name = "dead.proc:4343"
    ids = _dead_worker(r, name, 20, "out")
    procs = [subprocess.Popen([PYTHON, "-c", _RECOVER_PROC, f"p{i}"], env=env, cwd=str(REPO),
                              stdout=subprocess.PIPE, text=True) for i in range(6)]
    try:
        for _ in procs:  # every process connected and waiting, then released together
            assert blpop(r, f"{k.prefix}:ready", 30) is not None
        with r.pipeline() as pipe:
            for i in range(len(procs)):
                pipe.rpush(f"{k.prefix}:go:p{i}", 1)
            pipe.execute()
        results = [json.loads(p.communicate(timeout=30)[0]) for p in procs]
    finally:
        for p in procs:
            p.kill()
    _assert_requeued_once(r, name, ids, results)


@pytest.mark.parametrize("interval,ttl", [("0.5", "2"), ("0.25", "1")])
def test_live_busy_worker_job_is_never_stolen(r, k, spawn, interval, ttl):
    """A job running longer than HEARTBEAT_TTL on a live worker: other workers start (and recover) and the test
    itself runs recovery every 50 ms; the job runs once. The second case has heartbeats well under a second (the
    busy loop must beat that often, not once per second), with a TTL kept at 1 s for CPU-contention margin."""
    hb = {"HEARTBEAT_INTERVAL": interval, "HEARTBEAT_TTL": ttl, "JOB_MODULES": MODULES}
    a = spawn(**hb)
    a_name = f"{socket.gethostname()}:{a.pid}"
    job_seconds = max(5.0, 3 * float(ttl))
    make_broker(r).push("nl_hang_first", ["ev", job_seconds], {})
    assert next_event(r, "ev")["run"] == 1
    others = [spawn(**hb) for _ in range(2)]
    recoverer = make_broker(r, HEARTBEAT_INTERVAL=interval, HEARTBEAT_TTL=ttl)
    deadline = time.monotonic() + job_seconds + 15
    while r.llen("ev") == 0:
        assert time.monotonic() < deadline, "the job never finished"
        assert recoverer.recover(skip="test") == [], "a live worker's job was taken"
        time.sleep(0.05)
    done = next_event(r, "ev")
    assert (done["event"], done["run"]) == ("done", 1)
    wait_until(lambda: r.get(k.processed) == "1", 10, "the ack")
    assert r.get("ev:runs") == "1", "the job ran more than once"
    assert r.llen(k.queue("default")) == 0 and processing(r) == {}
    for w in [a] + others:
        assert "event=recovery." not in w.output, w.output
    assert r.zscore(k.workers, a_name) is not None


def _stall_until_recovered(r, w, timeout=20.0) -> list:
    """SIGSTOP worker ``w``'s supervisor (its job children run on) and recover it as soon as it counts as dead
    (late past HEARTBEAT_TTL, then its grace); it stays stopped: the caller sends SIGCONT."""
    k = keys_of(r)
    name = f"{socket.gethostname()}:{w.pid}"
    wait_until(lambda: r.zscore(k.workers, name) is not None, 10, "the worker registered")
    os.kill(w.pid, signal.SIGSTOP)
    recoverer = make_broker(r, **FAST)
    deadline = time.monotonic() + timeout
    got = []
    while r.zscore(k.workers, name) is not None:
        assert time.monotonic() < deadline, "the stopped worker was never recovered"
        time.sleep(0.1)
        got += recoverer.recover(skip="test")
    return got


def _works(r, w, tag: str) -> None:
    """``w`` (the only worker left) claims and runs a job."""
    job_id = make_broker(r).push("cc_span", ["works", tag], {"seconds": 0})
    assert next_event(r, "works")["event"] == "start"
    w.wait_for(rf"event=job\.done outcome=done job={job_id}")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("job_timeout", ["0", "3"], ids=["no-timeout", "timeout-passed-during-the-stall"])
def test_a_worker_that_stalled_past_its_ttl_stops_its_copy_of_a_recovered_job(r, k, spawn, job_timeout):
    """Worker A's process stalls (SIGSTOP: a frozen VM, a debugger) past HEARTBEAT_TTL and its grace, while its
    job's child runs on. Another worker is entitled to recover the job and run it. When A resumes, its first beat
    finds P:recovered:<A>: A must kill its own run at once (not let it finish beside the other one), record nothing
    of it, register again, and go on working. With a job timeout that passes during the stall, A kills the run for
    its timeout as it resumes, before or after that beat: still nothing of it may be recorded (no retry, no
    failure), and the log says why."""
    env = dict(FAST, JOB_TIMEOUT=job_timeout)
    a = spawn(**env)
    a.wait_for(r"event=worker\.start")
    a_name = f"{socket.gethostname()}:{a.pid}"
    job_id = make_broker(r).push("cc_span", ["ev", "t"], {"seconds": 60, "again": 1})
    first = next_event(r, "ev")
    assert (first["event"], first["run"]) == ("start", 1), first
    try:
        assert _stall_until_recovered(r, a) == [f"requeued:{job_id}"]
        assert make_broker(r).name_in_use(a_name)  # a new worker of the same name would erase the record
        b = spawn(**env)
        second = next_event(r, "ev")
        assert (second["event"], second["run"]) == ("start", 2), second
    finally:
        os.kill(a.pid, signal.SIGCONT)
    wait_until(lambda: not dyno.alive(first["pid"]), 5, "A's copy of the recovered job killed")
    a.wait_for(rf"event=job\.claim_lost .*job={job_id}", timeout=10)
    end = next_event(r, "ev")
    assert (end["event"], end["run"], end["pid"]) == ("end", 2, second["pid"]), end  # B's run, once
    wait_until(lambda: r.get(k.processed) == "1", 10, "B's ack")
    wait_until(lambda: r.hget(k.worker(a_name), "ttl") is not None, 10, "A registered again")
    assert not r.exists(k.recovered(a_name))
    assert f"event=job.done outcome=done job={job_id}" not in a.output, a.output
    assert r.zcard(k.failed) == 0 and r.zcard(k.scheduled) == 0, a.output  # A recorded nothing
    os.kill(b.pid, signal.SIGTERM)
    assert b.wait(10) == 0, b.output
    _works(r, a, "after")
    os.kill(a.pid, signal.SIGTERM)
    assert a.wait(10) == 0, a.output
    assert r.get("ev:runs:t") == "2" and r.llen("ev") == 0
    assert processing(r) == {} and r.zcard(k.workers) == 0 and r.llen(k.queue("default")) == 0


@pytest.mark.timeout(60)
def test_an_idle_worker_taken_for_dead_registers_again(r, k, spawn):
    """Recovery removes a dead worker's registration; if the worker was only stalled, its next beat used to leave
    it half-registered (no ttl, host, pid: judged by the old-version rule, shown empty by status)."""
    a = spawn(**FAST)
    a.wait_for(r"event=worker\.start")
    a_name = f"{socket.gethostname()}:{a.pid}"
    try:
        assert _stall_until_recovered(r, a) == []
        assert r.exists(k.recovered(a_name)) and not r.exists(k.worker(a_name))
    finally:
        os.kill(a.pid, signal.SIGCONT)
    wait_until(lambda: r.hget(k.worker(a_name), "ttl") is not None, 10, "A registered again")
    assert r.hget(k.worker(a_name), "pid") == str(a.pid)
    assert not r.exists(k.recovered(a_name))
    assert "event=job.claim_lost" not in a.output, a.output
    _works(r, a, "after")
    os.kill(a.pid, signal.SIGTERM)
    assert a.wait(10) == 0, a.output


@pytest.mark.timeout(60)
def test_a_claim_redis_lost_without_a_recovery_is_not_killed(r, k, spawn):
    """The processing list loses a running job's claim with no recovery behind it (eviction; simulated with DEL).
    Nobody else has the job: it must not be killed. It runs on to its end (its outcome finds no claim to record)
    and the worker says so once, and goes on working."""
    a = spawn(**FAST)
    a.wait_for(r"event=worker\.start")
    a_name = f"{socket.gethostname()}:{a.pid}"
    job_id = make_broker(r).push("cc_span", ["ev", "t"], {"seconds": 3})
    first = next_event(r, "ev")
    assert first["event"] == "start"
    assert r.delete(k.processing(a_name)) == 1
    a.wait_for(rf"event=redis\.claim_missing job={job_id}", timeout=10)
    end = next_event(r, "ev")
    assert (end["event"], end["pid"]) == ("end", first["pid"]), end  # the run went on to its end
    a.wait_for(rf"event=job\.done outcome=done job={job_id}")
    assert a.output.count("event=redis.claim_missing") == 1, a.output  # said once, not at every beat
    assert "event=job.claim_lost" not in a.output, a.output
    _works(r, a, "after")
    os.kill(a.pid, signal.SIGTERM)
    assert a.wait(10) == 0, a.output
    assert processing(r) == {} and r.llen(k.queue("default")) == 0


@pytest.mark.timeout(60)
def test_a_failover_that_missed_a_claim_records_the_job_once(r, k, spawn):
    """A failover to a replica that had not seen a claim: the claim is gone from the processing list and the job is
    back at the head of its queue. A second slot claims that copy. The worker must not write the first claim back
    (the job would then be recorded twice, and a failing one retried as two jobs)."""
    a = spawn(WORKER_CONCURRENCY="2", **FAST)
    a.wait_for(r"event=worker\.start")
    name = f"{socket.gethostname()}:{a.pid}"
    make_broker(r).push("cc_span", ["ev", "t"], {"seconds": 3, "again": 3})
    assert next_event(r, "ev")["run"] == 1
    (raw,) = r.lrange(k.processing(name), 0, -1)
    with r.pipeline(transaction=True) as p:
        p.delete(k.processing(name))
        p.lpush(k.queue("default"), raw)
        p.rpush(k.wake("default"), "1")
        p.execute()
    assert next_event(r, "ev")["run"] == 2  # the queued copy runs too (the failover's doing)
    a.wait_for(r"event=redis\.claim_missing", timeout=10)
    wait_until(lambda: a.output.count("event=job.done") == 2, 15, "both runs ended")
    wait_until(lambda: processing(r) == {}, 10, "the claim recorded")
    assert r.get(k.processed) == "1", a.output
    os.kill(a.pid, signal.SIGTERM)
    assert a.wait(10) == 0, a.output


def test_a_recovery_record_of_the_wrong_type_neither_wedges_nor_aborts(r, k):
    """``P:recovered:<w>`` holding something else (written by another program): the worker's call still works and
    reports it, reading it yields no recovered job, registering deletes it, and RECOVER still recovers a dead
    worker whose record it cannot write."""
    b = make_broker(r, **FAST)
    b.register("w:1", {"host": "h"})
    b.push("cc_span", ["ev", "t"], {"seconds": 0})
    r.set(k.recovered("w:1"), "x")
    c = b.cycle("w:1", claim=[0])
    assert c.recovered == 1 and len(c.claims) == 1 and c.held == 1
    assert b.claims_and_recovered("w:1") == ([c.claims[0].payload], set())
    b.register("w:1", {"host": "h"})
    assert not r.exists(k.recovered("w:1"))
    r.hset(k.recovered("w:1"), "a", "b")
    r.zadd(k.workers, {"w:1": 1})  # dead long ago
    seen_late_long_ago(r, "w:1")
    got = b.recover(skip="x")
    assert got == [f"requeued:{json.loads(c.claims[0].payload)['id']}"], got
    assert r.zscore(k.workers, "w:1") is None and r.type(k.recovered("w:1")) == "hash"
    assert r.llen(k.queue("default")) == 1
    assert b.cycle("w:2", beat=False).recovered == 0  # only beats look


@pytest.mark.timeout(90)
def test_job_whose_worker_keeps_vanishing_goes_to_failed(r, k, spawn):
    """MAX_ATTEMPTS=3: three workers die running it; the fourth worker's recovery records it as failed ("lost")
    with a 3-entry history instead of running it again. Each replacement starts once the dead worker's heartbeat
    has expired (a crashed dyno takes a while to come back) and recovers at start-up."""
    hb = dict(FAST, MAX_ATTEMPTS="3")
    reg = FailedRegistry(make_broker(r))
    job_id = make_broker(r).push("nl_hang", ["ev"], {})
    dead = []
    for _ in range(3):
        w = spawn(**hb)
        assert next_event(r, "ev")["event"] == "started"
        name = f"{socket.gethostname()}:{w.pid}"
        w.kill_tree()
        dead.append(name)
        wait_until(lambda: (r.zscore(k.workers, name) or 0) < redis_ms(r) - 2100, 10, "heartbeat expiry")
    last = spawn(**hb)
    last.wait_for(rf"event=recovery\.failed job={job_id}")
    rec = reg.get(job_id)
    assert rec is not None and rec["cause"] == "lost" and rec["type"] == "WorkerLost"
    assert rec["attempts"] == 3
    assert [h["cause"] for h in rec["history"]] == ["lost"] * 3
    assert [h["worker"] for h in rec["history"]] == dead
    assert json.loads(rec["payload"])["id"] == job_id
    assert r.llen("ev") == 0, "the poison job ran a fourth time"
    assert r.llen(k.queue("default")) == 0 and processing(r) == {}
    assert reg.count() == 1


@pytest.mark.timeout(60)
def test_a_dead_workers_claims_are_recovered_after_a_wrong_typed_workers_key_is_deleted(r, k, spawn):
    """Review of issue 27 item 1 (wrong-typed keys): ``P:workers`` overwritten with a string while a worker that
    holds claims is dead (SIGKILLed). The live worker logs ``redis.wrong_type`` for it and says "delete or rename
    the key"; once the operator does, the dead worker's claims must still be found and run (reproduced black-box:
    3 jobs left in ``P:processing:<dead>`` with status ``queued`` for 25 s+ after the fix, HEARTBEAT_TTL=3)."""
    ids = _dead_worker(r, "gone:1", 2, "ran")
    r.delete(k.workers)
    r.set(k.workers, "junk")  # another program wrote it
    w = spawn(**FAST)
    w.wait_for(rf"event=redis\.wrong_type key={re.escape(_value(k.workers))}")
    r.delete(k.workers)  # the fix the log line asks for
    got = [blpop(r, "ran", 20) for _ in ids]
    assert all(got), f"the dead worker's jobs never ran: processing={processing(r)} {w.output[-2500:]}"
    assert not r.exists(k.processing("gone:1"))


# --- a live worker's job is never recovered: each worker judged by its own TTL, through Redis stalls ---

@pytest.mark.timeout(60)
def test_redis_stall_past_the_ttl_recovers_no_live_workers_job(r, k, spawn, enqueue):
    """Origin: issue 10, core defect #3a."""
    hb = {"JOB_MODULES": TERM_MODULES, "HEARTBEAT_INTERVAL": "1", "HEARTBEAT_TTL": "3"}
    a = spawn(**hb)
    enqueue("cc_span", "ev", "long", seconds=9)
    wait_event(r, "ev", "start", "long")
    b = spawn(**hb)  # idle: the one that used to recover at once after the stall
    name_of(b)
    client_pause(url_of(home(r)), 4000)
    time.sleep(4.2)  # the stall; the test's own commands would only queue behind it
    wait_event(r, "ev", "end", "long", timeout=30)
    wait_until(lambda: r.get(k.processed) == "1", 10, "the ack")
    assert_ran_once(r, "ev", ["long"])
    for w in (a, b):
        assert "event=recovery." not in w.output, w.output
    assert processing(r) == {} and r.llen(k.queue("default")) == 0


@pytest.mark.timeout(60)
def test_fast_heartbeat_worker_never_recovers_a_default_workers_job(r, k, spawn, enqueue):
    """Origin: issue 10, core defect #3b."""
    a = spawn(JOB_MODULES=TERM_MODULES)  # defaults: HEARTBEAT_INTERVAL=5, HEARTBEAT_TTL=30
    enqueue("cc_span", "ev", "long", seconds=8)
    wait_event(r, "ev", "start", "long")
    b = spawn(JOB_MODULES=TERM_MODULES, HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="2")  # a one-off dyno, or a new release
    name_of(b)
    wait_event(r, "ev", "end", "long", timeout=30)
    wait_until(lambda: r.get(k.processed) == "1", 10, "the ack")
    assert_ran_once(r, "ev", ["long"])
    assert "event=recovery." not in b.output, b.output
    assert processing(r) == {} and r.llen(k.queue("default")) == 0


@pytest.mark.timeout(60)
def test_workers_with_different_heartbeats_through_a_stall_never_run_a_job_twice(r, k, spawn, enqueue):
    """Issue 10's "done when": two busy workers with different heartbeat settings and an idle third one, and a
    Redis stall longer than the shorter TTL (and than the longer one): every job runs once.

    Origin: issue 10, core defect #3b."""
    a = spawn(JOB_MODULES=TERM_MODULES, HEARTBEAT_INTERVAL="1", HEARTBEAT_TTL="3")
    enqueue("cc_span", "ev", "a", seconds=9)
    wait_event(r, "ev", "start", "a")
    b = spawn(JOB_MODULES=TERM_MODULES, HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="2")
    name_of(b)
    enqueue("cc_span", "ev", "b", seconds=8)
    wait_event(r, "ev", "start", "b")
    c = spawn(JOB_MODULES=TERM_MODULES, HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="2")
    name_of(c)
    client_pause(url_of(home(r)), 3500)
    time.sleep(3.7)  # the stall
    wait_event(r, "ev", "end", "a", timeout=30)
    wait_event(r, "ev", "end", "b", timeout=30)
    wait_until(lambda: r.get(k.processed) == "2", 10, "both acks")
    assert_ran_once(r, "ev", ["a", "b"])
    for w in (a, b, c):
        assert "event=recovery." not in w.output, w.output


@pytest.mark.timeout(60)
def test_a_recovery_call_queued_in_a_stall_spares_the_owner(r, k, spawn, enqueue):
    """The race the test above can hit by chance, made certain: a recovery pass sent while Redis is paused runs
    first when it resumes (Redis resumes paused clients in order), before the owner's queued heartbeat, and finds
    the owner's deadline passed. It must only mark it late; the owner beats within its grace, and its job runs
    once.

    Origin: issue 10, core defect #3b."""
    a = spawn(JOB_MODULES=TERM_MODULES, HEARTBEAT_INTERVAL="1", HEARTBEAT_TTL="3")
    a_name = name_of(a)
    enqueue("cc_span", "ev", "a", seconds=7)
    wait_event(r, "ev", "start", "a")
    recoverer = new_broker(r, socket_timeout=30, HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="2")
    home(recoverer.r).ping()  # connected to the node the stall is on (a new connection's handshake would queue)
    client_pause(url_of(home(r)), 4000)  # longer than A's TTL: its deadline passes inside the stall
    first = recoverer.recover(skip="test")  # queued behind the pause, ahead of A's next beat
    assert first == [] and first.wait is not None, (first, a.output)  # A was seen late, and only marked
    assert recoverer.r.hget(k.suspects, a_name) is not None
    while count(r, "ev", "end", "a") == 0:  # every later pass finds A alive (it beat within its grace)
        assert recoverer.recover(skip="test") == [], a.output
        time.sleep(0.05)
    wait_until(lambda: r.get(k.processed) == "1", 10, "the ack")
    assert_ran_once(r, "ev", ["a"])
    assert not r.hexists(k.suspects, a_name), "the mark goes once A beat again"


def test_a_late_worker_is_dead_only_after_its_grace_from_the_first_sighting(r, k):
    """lua.RECOVER's rule on a registered worker, step by step (no processes): late -> marked; beats -> mark
    dropped; late again -> marked afresh (an old mark never counts); late for its grace -> recovered.

    Origin: issue 10, core defect #3b."""
    cfg = {"HEARTBEAT_INTERVAL": "0.1", "HEARTBEAT_TTL": "0.7"}
    owner, other = make_broker(r, **cfg), make_broker(r, **cfg)
    owner.register("w:1", {"state": "busy"})
    r.rpush(k.processing("w:1"), worker_jobs.build_payload("push", ["out", 1], {}, None, 1024)[2])
    assert r.hget(k.worker("w:1"), "interval") == "100"
    r.zadd(k.workers, {"w:1": redis_ms(r) - 1})  # its deadline just passed
    seen = other.recover()
    assert seen == [] and 0 < seen.wait <= 1.1, seen.wait  # grace: its interval (0.1 s) + 1 s
    assert other.recover() == []  # still within its grace
    owner.heartbeat("w:1")
    again = other.recover()
    assert again == [] and again.wait is None and not r.exists(k.suspects)
    r.zadd(k.workers, {"w:1": redis_ms(r) - 1})
    fresh = other.recover()
    assert fresh == [] and fresh.wait > 1.0, fresh.wait  # marked afresh: the grace starts over
    time.sleep(fresh.wait + 0.05)
    done = other.recover()
    assert len(done) == 1 and done[0].startswith("requeued:") and done.wait is None
    assert r.llen(k.queue("default")) == 1 and not r.exists(k.suspects, k.processing("w:1"))


def test_a_mark_from_the_future_is_replaced(r, k):
    """A first-seen time ahead of Redis's clock (the clock stepped back, a failover to another host) must not
    delay recovery by the size of the step: the mark is taken afresh.

    Origin: issue 10, core defect #3b."""
    cfg = {"HEARTBEAT_INTERVAL": "0.1", "HEARTBEAT_TTL": "0.7"}
    owner, other = make_broker(r, **cfg), make_broker(r, **cfg)
    owner.register("w:2", {"state": "busy"})
    score = redis_ms(r) - 1
    r.zadd(k.workers, {"w:2": score})
    r.hset(k.suspects, "w:2", f"{score}@{redis_ms(r) + 10 ** 12}")
    seen = other.recover()
    assert seen == [] and 0 < seen.wait <= 1.1, seen.wait



# --- the recovery script survives hostile payloads and wrong-typed keys (nothing after its first write raises) ---

HOSTILE_ATTEMPTS = ["1e400", "-1e400", "NaN", "1e300", "-3", "2.5", '"7"', "[]", "true"]


@pytest.mark.parametrize("attempts", HOSTILE_ATTEMPTS)
def test_hostile_attempts_do_not_stop_recovery_of_any_worker(r, k, attempts):
    """``"attempts": 1e400`` made RECOVER raise on cjson.encode(inf) after its first write: the dead worker was never
    removed, so its earlier items were pushed again on every pass, and later dead workers were never recovered.

    Origin: issue 10, adversarial review #2."""
    b = make_broker(r, MAX_ATTEMPTS="5")
    hostile = '{"id":"h","name":"push","queue":"default","args":[],"kwargs":{},"attempts":%s}' % attempts
    r.zadd(k.workers, {"dead:1": 0, "dead:2": 1})
    # recovery walks a list from its tail: g2 is handled before the hostile entry, g1 after it
    r.rpush(k.processing("dead:1"), job_json("g1"), hostile, job_json("g2"))
    r.rpush(k.processing("dead:2"), job_json("g3", queue="mail"))
    seen_late_long_ago(r, "dead:1", "dead:2")
    results = [b.recover() for _ in range(3)]
    assert results[1] == [] and results[2] == [], results
    assert queued_loose_ids(r, "mail") == ["g3"]
    queued = queued_loose_ids(r)
    failed = r.zrange(k.failed, 0, -1)
    assert sorted(x for x in queued if x != "h") == ["g1", "g2"]
    assert queued.count("h") + failed.count("h") == 1, (queued, failed)
    assert r.zrange(k.workers, 0, -1) == []
    assert not r.exists(k.processing("dead:1"), k.processing("dead:2"))
    # whatever was written is valid JSON that the worker can read back
    for p in r.lrange(k.queue("default"), 0, -1):
        spec_doc = json.loads(p)
        assert isinstance(spec_doc["errors"], list)
    for rec in r.hvals(k.failed_data):
        assert json.loads(rec)["id"] == "h"


def test_recovery_survives_a_wake_key_of_the_wrong_type(r, k):
    """A payload names its queue, so it chooses the wake key RECOVER writes; a wrong-typed one must not abort it.

    Origin: issue 10, adversarial review #2."""
    b = make_broker(r)
    r.set(k.wake("odd"), "not a list")
    r.zadd(k.workers, {"dead:1": 0, "dead:2": 1})
    r.rpush(k.processing("dead:1"), job_json("g1"), job_json("o", queue="odd"), job_json("g2"))
    r.rpush(k.processing("dead:2"), job_json("g3"))
    seen_late_long_ago(r, "dead:1", "dead:2")
    for _ in range(3):
        b.recover()
    assert queued_loose_ids(r) == ["g1", "g2", "g3"]
    assert queued_loose_ids(r, "odd") == ["o"]
    assert r.zrange(k.workers, 0, -1) == []


def test_recovery_records_the_queue_of_a_payload_cjson_cannot_read(r, k):
    """#5: a lone surrogate escape defeats cjson; the failed record must still name the queue, or `failed retry`
    refuses to move it.

    Origin: issue 10, adversarial review #5."""
    b = make_broker(r)
    r.zadd(k.workers, {"dead:1": 0})
    r.rpush(k.processing("dead:1"), '{"id":"s","name":"push","queue":"mail","args":["\\udce9"],"kwargs":{}}')
    seen_late_long_ago(r, "dead:1")
    assert len(b.recover()) == 1
    (rec,) = [json.loads(x) for x in r.hvals(k.failed_data)]
    assert rec["queue"] == "mail"
    reg = FailedRegistry(b)
    assert reg.retry(reg.ids()) == [rec["id"]]
    assert r.llen(k.queue("mail")) == 1


def test_recovery_survives_unencodable_history_and_requeues_each_job_once(r, k):
    """cjson refuses to encode NaN: an error half-way through the recovery script kept its earlier writes and
    re-pushed the same jobs on every call.

    Origin: runtime review (9f32e73, hardening)."""
    b = make_broker(r, MAX_ATTEMPTS="5")
    poison = '{"id":"p","name":"push","queue":"default","args":[],"kwargs":{},"errors":[{"at":NaN}]}'
    good = json.dumps({"id": "g", "name": "push", "queue": "default", "args": [], "kwargs": {}})
    r.zadd(k.workers, {"dead:1": 0})
    r.rpush(k.processing("dead:1"), poison, good)
    seen_late_long_ago(r, "dead:1")
    assert sorted(b.recover()) == ["requeued:g", "requeued:p"]
    assert b.recover() == [] and b.recover() == []
    ids = sorted(json.loads(x.replace("NaN", "0"))["id"] for x in r.lrange(k.queue("default"), 0, -1))
    assert ids == ["g", "p"]


def test_recovery_without_a_queue_field_goes_to_default(r, k):
    """Origin: runtime review (9f32e73, hardening)."""
    b = make_broker(r)
    r.zadd(k.workers, {"dead:2": 0})
    r.rpush(k.processing("dead:2"), '{"id":"q","name":"push","args":[],"kwargs":{}}')
    seen_late_long_ago(r, "dead:2")
    assert b.recover() == ["requeued:q"]
    assert json.loads(r.lindex(k.queue("default"), 0))["id"] == "q"


def test_failed_retry_never_raises_after_a_write_so_no_job_is_both_queued_and_failed(r, k):
    """Adversarial review of issue 25 (retry_failed.lua): P:queues of the wrong type, or one record's queue key of
    the wrong type, made the script raise after it had pushed a job but before it removed its failed record: the
    job was queued and still failed, and the next `failed retry` queued it a second time (two runs). Now a job whose
    queue cannot take it stays failed, the others move, each once, and nothing raises."""
    b = make_broker(r)
    for i, q in (("a", "mail"), ("b", "odd"), ("c", "mail")):
        p = json.dumps({"id": i, "name": "push", "queue": q, "args": [], "kwargs": {}})
        r.zadd(k.failed, {i: 1})
        r.hset(k.failed_data, i, json.dumps({"id": i, "queue": q, "payload": p}))
    r.set(k.queue("odd"), "junk")
    r.set(k.queues, "junk")
    reg = FailedRegistry(b)
    assert sorted(reg.retry(["a", "b", "c"])) == ["a", "c"]
    assert reg.retry(["a", "b", "c"]) == []
    assert [json.loads(p)["id"] for p in r.lrange(k.queue("mail"), 0, -1)] == ["a", "c"]
    assert r.zrange(k.failed, 0, -1) == ["b"] and list(r.hkeys(k.failed_data)) == ["b"]
    r.delete(k.failed)
    r.set(k.failed, "junk")  # the registry itself unusable: an error, nothing moved
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        reg.retry(["b"])
    assert r.llen(k.queue("mail")) == 2 and r.hkeys(k.failed_data) == ["b"]
