"""A worker holds at most 2 Redis connections, whatever it is doing (Heroku's small Redis plans cap connections).

The runtime names its connections ``worker`` (commands: claims, outcomes, heartbeats), ``worker-wait`` (the idle
BLPOP on the wake lists, left pending while jobs run) and ``worker-exit`` (the last bookkeeping of a shutdown). While a non-burst worker drains bulk-enqueued no-op jobs, goes idle, wakes for
a second batch and shuts down on SIGTERM, the test samples ``CLIENT LIST`` in a tight loop: every connection that is not the test's own and did not exist
before the worker started belongs to the worker, there are never more than 2 of them at once, and only a few over
the whole run (a connection per job would show as hundreds).
"""
import signal
import time

import pytest

from worker import config
from worker.fetch import Broker

BATCH = 300
HANDSHAKE = ("NULL", "ping", "hello", "auth")  # a connection's last command while redis-py sets it up
NAMES = {"worker", "worker-wait", "worker-exit"}  # client_name of the runtime's connections (client.connect)


def _worker_conns(r, own_id, before):
    """Connections other than the test's own and the ones that predate the worker."""
    return [c for c in r.client_list() if int(c["id"]) != own_id and int(c["id"]) not in before]


@pytest.mark.timeout(90)
def test_worker_uses_at_most_two_connections(r, redis_server, spawn):
    own_id = r.client_id()  # this test talks to Redis through `r` only (one connection: single-threaded)
    before = {int(c["id"]) for c in r.client_list()}
    broker = Broker(r, config.from_mapping({"REDIS_URL": redis_server.url}))
    w = spawn(LOG_LEVEL="INFO")  # non-burst; DEBUG would add a log line per job for nothing
    w.wait_for(r"event=worker\.start")

    peak, names, ids, samples_mid_flow = 0, set(), set(), 0

    def sample():
        nonlocal peak
        conns = _worker_conns(r, own_id, before)
        peak = max(peak, len(conns))
        ids.update(c["id"] for c in conns)
        # redis-py names a connection with CLIENT SETNAME after PING/HELLO: one caught before has no name yet
        names.update(c["name"] for c in conns if c["cmd"] not in HANDSHAKE)
        assert len(conns) <= 2, f"worker holds {len(conns)} connections: {conns}"
        return conns

    for wave in (1, 2):  # the second wave wakes the worker from its idle blocking pop
        broker.push_many("noop", [()] * BATCH)
        target = wave * BATCH
        deadline = time.monotonic() + 60
        while True:
            sample()
            done = int(r.get("worker:stat:processed") or 0)
            if done >= target:
                break
            if done > (wave - 1) * BATCH:
                samples_mid_flow += 1
            assert time.monotonic() < deadline, f"only {done} of {target} jobs done; output:\n{w.output}"
        # idle: the worker blocks on its wake-up list (through the same connection); keep sampling meanwhile
        idle_until = time.monotonic() + 0.3
        while time.monotonic() < idle_until:
            sample()

    # shutdown: the main connection is closed and a short-lived `worker-exit` one does the last bookkeeping
    w.signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    while w.popen.poll() is None:
        sample()
        assert time.monotonic() < deadline, f"worker did not exit; output:\n{w.output}"
    assert w.wait(5) == 0, w.output

    assert int(r.get("worker:stat:processed")) == 2 * BATCH
    assert samples_mid_flow >= 3, "CLIENT LIST was never sampled while jobs were flowing"
    assert peak >= 1 and "worker" in names, f"the worker's connection was never seen (names: {names})"
    assert names <= NAMES, f"unexpected connection names {names}: not named by the runtime?"
    # one connection for the whole run plus the shutdown one: never a connection per job (a little slack for a
    # reconnect, far below the 600 jobs)
    assert len(ids) <= 4, f"the worker opened {len(ids)} connections for {2 * BATCH} jobs"


@pytest.mark.timeout(60)
def test_long_job_heartbeats_and_shutdown_stay_within_two(r, redis_server, spawn):
    """A job longer than a heartbeat interval: the worker keeps beating (on its command connection) while the idle
    BLPOP may stay pending on the other; a SIGTERM then adds the shutdown connection. Never more than 2 at once."""
    own_id = r.client_id()
    before = {int(c["id"]) for c in r.client_list()}
    w = spawn(HEARTBEAT_INTERVAL="0.2", HEARTBEAT_TTL="1.5")
    w.wait_for(r"event=worker\.start")
    Broker(r, config.from_mapping({"REDIS_URL": redis_server.url})).push("sample_work", [20, 0.5], {})
    w.wait_for(r"event=job\.start .*name=sample_work")
    peak, names = 0, set()

    def sample():
        nonlocal peak
        conns = _worker_conns(r, own_id, before)
        peak = max(peak, len(conns))
        names.update(c["name"] for c in conns if c["cmd"] not in HANDSHAKE)
        assert len(conns) <= 2, f"worker holds {len(conns)} connections: {conns}"

    (key,) = r.keys("worker:worker:*")
    beats, last, deadline = 0, r.hget(key, "seen"), time.monotonic() + 10
    while beats < 3:  # three fresh heartbeats while the job runs
        sample()
        seen = r.hget(key, "seen")
        if seen != last:
            beats, last = beats + 1, seen
        assert time.monotonic() < deadline, f"no heartbeats while busy; output:\n{w.output}"
    assert r.hget(key, "state") == "busy"
    w.signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    while w.popen.poll() is None:
        sample()
        assert time.monotonic() < deadline, f"worker did not exit; output:\n{w.output}"
    assert w.wait(5) == 0, w.output
    assert "graceful shutdown!" in w.output  # the job ran to its cleanup: the shutdown path was the real one
    assert names <= NAMES, f"unexpected connection names {names}"


@pytest.mark.timeout(30)
def test_an_error_reply_keeps_the_workers_connection(redis_server):
    """NOSCRIPT (every script's first use by a worker) and a script's own error reply are read whole: the connection
    is in step and is kept. Dropping it made a starting worker open one connection per script (6 where the test
    above allows 4, seen under load while reshaping issue 22)."""
    import os
    import redis as redis_py
    from worker.client import Link
    r = redis_py.Redis.from_url(redis_server.url, decode_responses=True)
    link = Link(r, os.pipe()[0], lambda: None, lambda: 1.0)
    first = link.execute("CLIENT", "ID")
    fresh = r.register_script(f"return {int(time.time() * 1e6)}")  # never loaded: EVALSHA answers NOSCRIPT
    assert link.script(fresh, [], []) == int(fresh.script.split()[1])
    with pytest.raises(redis_py.ResponseError):
        link.execute("EVAL", "return redis.error_reply('refused')", 0)
    assert link.execute("CLIENT", "ID") == first
