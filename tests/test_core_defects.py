"""Regression tests for the core defects of issue 10: never two runs of one job at once, nothing wedged.

* #1  a fork server that stalls past the spawn timeout: the job is never handed over twice, the server is replaced,
      and later jobs are recorded as what they were (not "child exited with code 70").
* #3a a Redis stall longer than HEARTBEAT_TTL: no live worker's job is recovered.
* #3b a worker is judged by its own HEARTBEAT_TTL, not the recovering worker's; and two workers with different
      heartbeat settings through a Redis stall beyond the shorter TTL: no job runs twice at once.
* #3c a fork-server restart with a slow import: the worker keeps beating; nothing of it is recovered.
* hardening: a claim adopted after a lost reply, not yet started when a stop arrives, goes back to its queue.

Every test here runs a single slot (the default) so it also runs against the code before the rewrite (9a39a1e).
Jobs record start/end events with their pid (tests/jobs.py ``cc_span``); overlapping runs of one tag are the defect.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
import redis

from tests import dyno
from tests.support import client_pause, events, forkserver_of, overlaps, runs, wait_until
from worker import jobs as worker_jobs
from worker.config import from_mapping
from worker.fetch import Broker

MODULES = "worker.sample,tests.jobs,tests.jobs_term"
QUEUE = "worker:queue:default"
WORKERS = "worker:workers"


@pytest.fixture
def enqueue(r, redis_server):
    broker = Broker(r, from_mapping({"REDIS_URL": redis_server.url}))
    return lambda name, *args, **kwargs: broker.push(name, args, kwargs)


def processing(r) -> dict:
    return {k: r.lrange(k, 0, -1) for k in r.keys("worker:processing:*") if r.llen(k)}


def count(r, key, kind, tag=None) -> int:
    return sum(e["event"] == kind and (tag is None or e.get("tag") == tag) for e in events(r, key))


def wait_event(r, key, kind, tag=None, n=1, timeout=20.0) -> None:
    wait_until(lambda: count(r, key, kind, tag) >= n, timeout, f"{n} {kind!r} {tag or ''} on {key}")


def name_of(w) -> str:
    return re.search(r"worker=(\S+)", w.wait_for(r"event=worker\.start")).group(1)


def redis_ms(r) -> int:
    sec, usec = r.time()
    return sec * 1000 + usec // 1000


def assert_ran_once(r, key, tags) -> None:
    evs = events(r, key)
    assert overlaps(evs) == [], f"a job ran twice at once: {overlaps(evs)}"
    got = runs(evs)
    for tag in tags:
        assert len(got.get(tag, [])) == 1, f"{tag} ran {len(got.get(tag, []))} times: {got}"


# --- #1 fork-server stall ---

@pytest.mark.slow
@pytest.mark.timeout(90)
def test_fork_server_stall_never_hands_a_job_over_twice(r, spawn, enqueue):
    w = spawn(JOB_MODULES=MODULES)
    enqueue("cc_span", "ev", "warm-up", seconds=0.05)  # the fork server is up and has run a job
    wait_event(r, "ev", "end", "warm-up")
    [server] = forkserver_of(w.pid)
    os.kill(server, signal.SIGSTOP)
    try:
        first = enqueue("cc_span", "ev", "a", seconds=0.5)
        wait_until(lambda: processing(r), 10, "the claim")
        time.sleep(12)  # the stall itself: longer than the 10 s the worker gives a spawn
    finally:
        try:
            os.kill(server, signal.SIGCONT)
        except ProcessLookupError:
            pass  # replaced (killed) by the worker: what the fix does
    w.wait_for(r"event=forkserver\.restart")
    w.wait_for(rf"event=job\.done .*job={first}", timeout=20)
    # later jobs: each recorded done, with its own duration
    later = {"b": (enqueue("cc_span", "ev", "b", seconds=0.3), 0.3),
             "c": (enqueue("cc_span", "ev", "c", seconds=1.2), 1.2)}
    for tag, (job_id, secs) in later.items():
        line = w.wait_for(rf"event=job\.done .*job={job_id}", timeout=20)
        took = float(re.search(r"duration=([\d.]+)", line).group(1))
        assert secs <= took < secs + 0.8, (tag, line)
    wait_until(lambda: processing(r) == {}, 10, "every job acknowledged")
    assert "code 70" not in w.output and "event=job.failed" not in w.output, w.output
    assert_ran_once(r, "ev", ["warm-up", "a", "b", "c"])
    assert r.zcard("worker:failed") == 0 and r.get("worker:stat:processed") == "4"


# --- #3a a Redis stall longer than HEARTBEAT_TTL ---

@pytest.mark.timeout(60)
def test_redis_stall_past_the_ttl_recovers_no_live_workers_job(r, spawn, enqueue, redis_server):
    hb = {"JOB_MODULES": MODULES, "HEARTBEAT_INTERVAL": "1", "HEARTBEAT_TTL": "3"}
    a = spawn(**hb)
    enqueue("cc_span", "ev", "long", seconds=9)
    wait_event(r, "ev", "start", "long")
    b = spawn(**hb)  # idle: the one that used to recover at once after the stall
    name_of(b)
    client_pause(redis_server.url, 4000)
    time.sleep(4.2)  # the stall; the test's own commands would only queue behind it
    wait_event(r, "ev", "end", "long", timeout=30)
    wait_until(lambda: r.get("worker:stat:processed") == "1", 10, "the ack")
    assert_ran_once(r, "ev", ["long"])
    for w in (a, b):
        assert "event=recovery." not in w.output, w.output
    assert processing(r) == {} and r.llen(QUEUE) == 0


# --- #3b each worker judged by its own TTL ---

@pytest.mark.timeout(60)
def test_fast_heartbeat_worker_never_recovers_a_default_workers_job(r, spawn, enqueue):
    a = spawn(JOB_MODULES=MODULES)  # defaults: HEARTBEAT_INTERVAL=5, HEARTBEAT_TTL=30
    enqueue("cc_span", "ev", "long", seconds=8)
    wait_event(r, "ev", "start", "long")
    b = spawn(JOB_MODULES=MODULES, HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="2")  # a one-off dyno, or a new release
    name_of(b)
    wait_event(r, "ev", "end", "long", timeout=30)
    wait_until(lambda: r.get("worker:stat:processed") == "1", 10, "the ack")
    assert_ran_once(r, "ev", ["long"])
    assert "event=recovery." not in b.output, b.output
    assert processing(r) == {} and r.llen(QUEUE) == 0


@pytest.mark.timeout(60)
def test_workers_with_different_heartbeats_through_a_stall_never_run_a_job_twice(r, spawn, enqueue, redis_server):
    """Issue 10's "done when": two busy workers with different heartbeat settings and an idle third one, and a
    Redis stall longer than the shorter TTL (and than the longer one): every job runs once."""
    a = spawn(JOB_MODULES=MODULES, HEARTBEAT_INTERVAL="1", HEARTBEAT_TTL="3")
    enqueue("cc_span", "ev", "a", seconds=9)
    wait_event(r, "ev", "start", "a")
    b = spawn(JOB_MODULES=MODULES, HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="2")
    name_of(b)
    enqueue("cc_span", "ev", "b", seconds=8)
    wait_event(r, "ev", "start", "b")
    c = spawn(JOB_MODULES=MODULES, HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="2")
    name_of(c)
    client_pause(redis_server.url, 3500)
    time.sleep(3.7)  # the stall
    wait_event(r, "ev", "end", "a", timeout=30)
    wait_event(r, "ev", "end", "b", timeout=30)
    wait_until(lambda: r.get("worker:stat:processed") == "2", 10, "both acks")
    assert_ran_once(r, "ev", ["a", "b"])
    for w in (a, b, c):
        assert "event=recovery." not in w.output, w.output


@pytest.mark.timeout(60)
def test_a_recovery_call_queued_in_a_stall_spares_the_owner(r, spawn, enqueue, redis_server):
    """The race the test above can hit by chance, made certain: a recovery pass sent while Redis is paused runs
    first when it resumes (Redis resumes paused clients in order), before the owner's queued heartbeat, and finds
    the owner's deadline passed. It must only mark it late; the owner beats within its grace, and its job runs
    once."""
    a = spawn(JOB_MODULES=MODULES, HEARTBEAT_INTERVAL="1", HEARTBEAT_TTL="3")
    a_name = name_of(a)
    enqueue("cc_span", "ev", "a", seconds=7)
    wait_event(r, "ev", "start", "a")
    recoverer = Broker(redis.Redis.from_url(redis_server.url, decode_responses=True, socket_timeout=30),
                       from_mapping({"REDIS_URL": redis_server.url, "HEARTBEAT_INTERVAL": "0.5",
                                     "HEARTBEAT_TTL": "2"}))
    recoverer.r.ping()
    client_pause(redis_server.url, 4000)  # longer than A's TTL: its deadline passes inside the stall
    first = recoverer.recover(skip="test")  # queued behind the pause, ahead of A's next beat
    assert first == [] and first.wait is not None, (first, a.output)  # A was seen late, and only marked
    assert recoverer.r.hget("worker:suspects", a_name) is not None
    while count(r, "ev", "end", "a") == 0:  # every later pass finds A alive (it beat within its grace)
        assert recoverer.recover(skip="test") == [], a.output
        time.sleep(0.05)
    wait_until(lambda: r.get("worker:stat:processed") == "1", 10, "the ack")
    assert_ran_once(r, "ev", ["a"])
    assert not r.hexists("worker:suspects", a_name), "the mark goes once A beat again"


def test_a_late_worker_is_dead_only_after_its_grace_from_the_first_sighting(r, redis_server):
    """lua.RECOVER's rule on a registered worker, step by step (no processes): late -> marked; beats -> mark
    dropped; late again -> marked afresh (an old mark never counts); late for its grace -> recovered."""
    cfg = {"REDIS_URL": redis_server.url, "HEARTBEAT_INTERVAL": "0.1", "HEARTBEAT_TTL": "0.7"}
    owner, other = Broker(r, from_mapping(cfg)), Broker(r, from_mapping(cfg))
    owner.register("w:1", {"state": "busy"})
    r.rpush("worker:processing:w:1", worker_jobs.build_payload("push", ["out", 1], {}, None, 1024)[2])
    assert r.hget("worker:worker:w:1", "interval") == "100"
    r.zadd(WORKERS, {"w:1": redis_ms(r) - 1})  # its deadline just passed
    seen = other.recover()
    assert seen == [] and 0 < seen.wait <= 1.1, seen.wait  # grace: its interval (0.1 s) + 1 s
    assert other.recover() == []  # still within its grace
    owner.heartbeat("w:1")
    again = other.recover()
    assert again == [] and again.wait is None and not r.exists("worker:suspects")
    r.zadd(WORKERS, {"w:1": redis_ms(r) - 1})
    fresh = other.recover()
    assert fresh == [] and fresh.wait > 1.0, fresh.wait  # marked afresh: the grace starts over
    time.sleep(fresh.wait + 0.05)
    done = other.recover()
    assert len(done) == 1 and done[0].startswith("requeued:") and done.wait is None
    assert r.llen(QUEUE) == 1 and not r.exists("worker:suspects", "worker:processing:w:1")


def test_a_mark_from_the_future_is_replaced(r, redis_server):
    """A first-seen time ahead of Redis's clock (the clock stepped back, a failover to another host) must not
    delay recovery by the size of the step: the mark is taken afresh."""
    cfg = {"REDIS_URL": redis_server.url, "HEARTBEAT_INTERVAL": "0.1", "HEARTBEAT_TTL": "0.7"}
    owner, other = Broker(r, from_mapping(cfg)), Broker(r, from_mapping(cfg))
    owner.register("w:2", {"state": "busy"})
    score = redis_ms(r) - 1
    r.zadd(WORKERS, {"w:2": score})
    r.hset("worker:suspects", "w:2", f"{score}@{redis_ms(r) + 10 ** 12}")
    seen = other.recover()
    assert seen == [] and 0 < seen.wait <= 1.1, seen.wait


# --- hardening: Redis loses its data (a restart without persistence) while a job runs ---

@pytest.mark.timeout(60)
@pytest.mark.parametrize("seen_at", ["beat", "stop"])
def test_a_job_held_through_redis_data_loss_is_claimed_again_and_put_back_on_stop(r, spawn, enqueue, seen_at):
    """Redis restarted empty under a running job: its claim, the worker's registration and the status record are
    gone, and only the worker knows the job. At its next beat (or the stop's call, if that comes first) the worker
    sees P:epoch gone, registers again and claims the job again, so the stop puts it back (before: the put-back
    found no claim and dropped the job) and a dyno killed outright would leave it recoverable."""
    interval, ttl = ("0.5", "2") if seen_at == "beat" else ("10", "30")
    w = spawn(JOB_MODULES=MODULES, HEARTBEAT_INTERVAL=interval, HEARTBEAT_TTL=ttl, SHUTDOWN_WINDOW="4")
    name = name_of(w)
    running = enqueue("tt_reraise", "ev")
    wait_until(lambda: count(r, "ev", "started") == 1, 15, "the running job")
    r.flushall()  # what a Key-Value Store restarted without persistence looks like
    if seen_at == "beat":
        w.wait_for(r"event=redis\.data_lost .*held=1")
        wait_until(lambda: [json.loads(p)["id"] for p in r.lrange(f"worker:processing:{name}", 0, -1)] == [running],
                   10, "the claim restored")
        assert r.zscore(WORKERS, name) is not None and r.hget(f"worker:worker:{name}", "job:0")
    rep = dyno.shutdown(w.pid, window=4)
    assert not rep.sigkilled, rep
    assert w.wait(5) == 0, w.output
    assert [json.loads(p)["id"] for p in r.lrange(QUEUE, 0, -1)] == [running], w.output
    assert processing(r) == {} and r.zscore(WORKERS, name) is None, w.output
    assert "event=redis.data_lost" in w.output
    assert r.smembers("worker:queues") == {"default"}, "a QUEUES=* worker must find the job put back"


@pytest.mark.timeout(60)
def test_an_outcome_between_beats_after_data_loss_is_recorded(r, spawn, enqueue):
    """The data loss is first seen by a call that records an outcome, not by a beat (the interval is long): the
    call must not drop it as "not ours" (its claim is gone with the data); the worker restores and records it."""
    w = spawn(JOB_MODULES=MODULES, HEARTBEAT_INTERVAL="10", HEARTBEAT_TTL="30")
    name_of(w)
    job_id = enqueue("cc_span", "ev", "short", seconds=1.5)
    wait_event(r, "ev", "start", "short")
    r.flushall()  # a restart without persistence, while the job runs
    w.wait_for(rf"event=job\.done .*job={job_id}")
    w.wait_for(r"event=redis\.data_lost .*held=1")
    wait_until(lambda: r.get("worker:stat:processed") == "1", 10, "the outcome recorded after the restore")
    assert r.hget(f"worker:job:{job_id}", "status") == "done"
    assert processing(r) == {}


# --- #3c a fork-server restart with a slow import ---

@pytest.mark.slow
@pytest.mark.timeout(60)
def test_fork_server_restart_with_a_slow_import_keeps_the_worker_alive(r, spawn, enqueue, tmp_path):
    marker = tmp_path / "slow-import"
    hb = {"JOB_MODULES": MODULES, "HEARTBEAT_INTERVAL": "0.5", "HEARTBEAT_TTL": "2"}
    a = spawn(CC_SLOW_IMPORT_MARKER=str(marker), CC_SLOW_IMPORT_SECONDS="5", **hb)
    a_name = name_of(a)
    enqueue("cc_span", "ev", "one", seconds=60, again=0.2)  # lost with the server: it runs again, first
    wait_event(r, "ev", "start", "one")
    second = enqueue("cc_span", "ev", "two", seconds=0.5)  # waits for the slot; claimed around the restart
    b = spawn(QUEUES="elsewhere", **hb)  # recovers, never claims from default
    name_of(b)
    marker.touch()  # from now on the app takes 5 s to import (> HEARTBEAT_TTL)
    [server] = forkserver_of(a.pid)
    os.kill(server, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while count(r, "ev", "end", "two") == 0:  # all along, the worker's own deadline stays ahead of Redis's clock
        assert time.monotonic() < deadline, a.output
        score = r.zscore(WORKERS, a_name)
        if score is not None and not r.hexists(f"worker:worker:{a_name}", "ttl"):
            score += 2000  # a worker before the rewrite wrote its last beat, not its deadline
        assert score is not None and score > redis_ms(r), f"worker A looked dead during the restart\n{a.output}"
        time.sleep(0.1)
    a.wait_for(rf"event=job\.done .*job={second}")
    wait_until(lambda: processing(r) == {}, 10, "the ack")
    time.sleep(0.5)
    assert "event=recovery." not in b.output, b.output
    assert len(runs(events(r, "ev")).get("two", [])) == 1, events(r, "ev")
    assert r.llen(QUEUE) == 0
    assert "event=forkserver.restart" in a.output, a.output


# --- hardening: a claim adopted after a lost reply, not started when the stop comes ---

@pytest.mark.timeout(60)
def test_adopted_claim_not_yet_started_is_put_back_on_stop(r, spawn, enqueue):
    """A claim whose reply was lost sits in the worker's processing list unknown to it; the worker adopts it when
    its count of held jobs disagrees. Here the single slot is busy, so the adopted claim cannot start; a TERM must
    put it back at the head of its queue, not leave it to recovery (a false "worker vanished" attempt)."""
    w = spawn(JOB_MODULES=MODULES, HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="2", SHUTDOWN_WINDOW="4")
    name = name_of(w)
    running = enqueue("tt_reraise", "ev")
    wait_until(lambda: count(r, "ev", "started") == 1, 15, "the running job")
    wait_until(lambda: dyno.sleeping(w.pid), 10, "the job sleeping")
    lost_id, _, lost = worker_jobs.build_payload("push", ["out", "lost"], {}, None, 512 * 1024)
    r.rpush(f"worker:processing:{name}", lost)  # as a CYCLE whose reply never arrived would have left it
    seen = [r.zscore(WORKERS, name)]

    def beats():  # a few heartbeats later the worker has seen the count and adopted the claim
        s = r.zscore(WORKERS, name)
        if s != seen[-1]:
            seen.append(s)
        return len(seen) > 3
    wait_until(beats, 10, "three heartbeats")
    rep = dyno.shutdown(w.pid, window=4)
    assert not rep.sigkilled, rep
    assert w.wait(5) == 0, w.output
    queued = [json.loads(p)["id"] for p in r.lrange(QUEUE, 0, -1)]
    assert sorted(queued) == sorted([running, lost_id]), (queued, w.output)
    assert processing(r) == {} and r.zscore(WORKERS, name) is None, w.output
    assert r.llen("out") == 0, "the adopted claim ran although its slot was busy"
