"""Enqueue, the producer side (``Broker.push``/``push_many``, ``worker.enqueue*``, ``python -m worker enqueue``):
an enqueue retried after a timeout or a lost reply enqueues once, delays are measured on the Redis clock, and what
cannot be read back (lone surrogates, bad queue names, non-finite delays) is refused before anything is written.

Where a job goes (``@job(queue=)``) is in tests/test_job_api_producer.py; the CLI's argument checks in test_core.py.
Stalls are real: a SIGSTOPped redis-server, a TCP proxy that loses one reply.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import pytest
import redis

import worker.config
from worker import client, jobs
from worker.fetch import Broker

from tests.support import make_broker, queued_loose_ids


# --- an enqueue retried after a timeout or a lost reply enqueues once ---

@pytest.fixture
def default_broker():
    """Restore the module-level enqueue broker after a test that sets it."""
    yield
    jobs.use(None)


class Stall:
    """SIGSTOP the redis-server for ``seconds`` (a real stall: the kernel still accepts connections and buffers
    commands, which all run when the server resumes)."""

    def __init__(self, proc, seconds):
        self.proc, self.seconds = proc, seconds

    def __enter__(self):
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.timer = threading.Timer(self.seconds, os.kill, (self.proc.pid, signal.SIGCONT))
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.join()
        os.kill(self.proc.pid, signal.SIGCONT)  # also if the body raised before the timer fired


def _short_timeout_broker(redis_server, r):
    """The producer's client with REDIS_TIMEOUT=0.3, warmed up (its script loaded, as for any producer that has
    enqueued before: otherwise NOSCRIPT replies make redis-py load and re-send, which hides the retry)."""
    cfg = worker.config.from_mapping({"REDIS_URL": redis_server.url, "REDIS_TIMEOUT": "0.3"})
    b = Broker(client.connect(cfg, name="enqueue"), cfg)
    b.push("push", [], {}, queue="warmup")
    b.push("push", [], {}, queue="warmup", due=time.time() + 60)
    r.flushall()
    return b


@pytest.mark.timeout(60)
def test_enqueue_retried_after_a_stall_enqueues_once(r, redis_server):
    """Origin: issue 10, adversarial review #4."""
    b = _short_timeout_broker(redis_server, r)
    with Stall(redis_server.proc, 1.2):
        job_id = b.push("push", ["x", 1], {})
    assert queued_loose_ids(r) == [job_id]
    assert r.scard("worker:queues") == 1
    assert all(r.ttl(k) > 0 for k in r.keys("worker:enq:*")), "every dedupe key must expire"


@pytest.mark.timeout(60)
def test_enqueue_many_retried_after_a_stall_enqueues_once(r, redis_server):
    """The stall starts once the server has run the first batch of the pipeline (observed from another
    connection), so it hits the pipeline's own round trip, which redis-py re-sends whole after the timeout.

    Origin: issue 10, adversarial review #4."""
    b = _short_timeout_broker(redis_server, r)
    watcher = redis.Redis.from_url(redis_server.url, decode_responses=True)
    started, stop = threading.Event(), threading.Event()

    def stall_mid_pipeline():
        while not stop.is_set():
            if watcher.llen("worker:queue:default"):
                started.set()
                with Stall(redis_server.proc, 1.2):
                    pass
                return

    t = threading.Thread(target=stall_mid_pipeline)
    t.start()
    try:
        ids = b.push_many("push", [["x", i] for i in range(20000)])
    finally:
        stop.set()
        t.join()
    assert started.is_set()
    assert len(ids) == 20000
    queued = queued_loose_ids(r)
    assert len(queued) == len(set(queued)) == 20000
    assert all(r.ttl(k) > 0 for k in r.keys("worker:enq:*")), "every dedupe key must expire"


class LossyProxy:
    """A TCP proxy to the test Redis that can lose exactly one reply (``lose_next_reply()``): the command ran, the
    client never hears so, times out and re-sends it on a new connection, as after a network stall."""

    def __init__(self, port):
        self.target = port
        self.lose = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def lose_next_reply(self):
        self.lose.set()

    def _accept(self):
        while not self.closing:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            s = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(c, s, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(s, c, True), daemon=True).start()

    def _pump(self, src, dst, replies):
        try:
            while data := src.recv(65536):
                if replies and self.lose.is_set():
                    self.lose.clear()
                    continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for x in (src, dst):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.closing = True
        self.sock.close()


@pytest.mark.timeout(60)
def test_enqueue_in_whose_reply_is_lost_schedules_once(r, redis_server):
    """ZADD of the same payload is idempotent only while the job is still scheduled: with a short delay, the first
    copy was moved to its queue before redis-py's re-sent ZADD scheduled it again, and the job ran twice.

    Origin: issue 10, adversarial review #4."""
    proxy = LossyProxy(redis_server.port)
    try:
        cfg = worker.config.from_mapping({"REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0", "REDIS_TIMEOUT": "0.5"})
        b = Broker(client.connect(cfg, name="enqueue"), cfg)
        b.push("push", [], {}, queue="warmup", due=time.time() + 60)  # its script loaded, its connection open
        r.flushall()
        mover = make_broker(r)
        ids = []
        proxy.lose_next_reply()
        t = threading.Thread(target=lambda: ids.append(b.push("push", ["x", 1], {}, due=time.time() + 0.1)))
        t.start()
        while t.is_alive() or r.zcard("worker:scheduled"):  # move due jobs as a worker does
            mover.cycle("mover:1")
            time.sleep(0.02)
        t.join()
        assert len(ids) == 1 and not proxy.lose.is_set()
        mover.cycle("mover:1")
        assert queued_loose_ids(r) == ids
    finally:
        proxy.close()


def test_enqueue_many_in_batches_enqueues_each_job_once(r, redis_server):
    """Deduplication is per batch call (its first job's id): batches of one enqueue_many must not shadow each other.
    (Its speed is measured by the throughput benchmark, not asserted here.)

    Origin: issue 10, adversarial review #4."""
    b = make_broker(r)
    calls = [["x", i] for i in range(40000)]
    ids = b.push_many("push", calls)
    assert r.llen("worker:queue:default") == len(calls) == len(set(ids))
    assert [json.loads(p)["args"][1] for p in r.lrange("worker:queue:default", 0, -1)] == list(range(40000))



# --- delays: the Redis clock, the past, bad values ---

def test_enqueue_in_uses_the_redis_clock(r, monkeypatch):
    """Origin: issue 10, adversarial review, producer-side hardening."""
    b = make_broker(r)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # the producer's clock runs an hour ahead
    b.push("push", ["x", 1], {}, delay=5)
    monkeypatch.setattr(time, "time", real)
    sec, usec = r.time()
    now_ms = sec * 1000 + usec // 1000
    (score,) = [s for _, s in r.zrange("worker:scheduled", 0, -1, withscores=True)]
    assert now_ms + 3000 < score <= now_ms + 5000


def test_enqueue_at_in_the_past_is_queued_at_once(r):
    """Origin: issue 10, adversarial review, producer-side hardening."""
    b = make_broker(r)
    job_id = b.push("push", ["x", 1], {}, due=time.time() - 60)
    assert queued_loose_ids(r) == [job_id] and r.zcard("worker:scheduled") == 0


@pytest.mark.parametrize("delay", ["nan", "inf", "-1", "-inf"])
def test_enqueue_in_rejects_non_finite_or_negative_delays(r, cli, delay):
    """Origin: issue 10, adversarial review #8."""
    out = cli("enqueue", "noop", f"--in={delay}")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "--in" in out.stderr and "finite" in out.stderr
    assert r.dbsize() == 0


def test_enqueue_in_api_rejects_nan(r, default_broker):
    """Origin: issue 10, adversarial review #8."""
    jobs.use(make_broker(r))
    with pytest.raises(ValueError):
        jobs.enqueue_in(float("nan"), "noop")
    assert r.dbsize() == 0


def test_job_parameters_named_name_seconds_when(r, default_broker):
    """Origin: issue 10, adversarial review #8."""
    from datetime import datetime, timedelta, timezone

    @jobs.job(name="issue10_params")
    def params(name, seconds=0, when=None):
        return name

    jobs.use(make_broker(r))
    params.enqueue(name="n")
    params.enqueue_in(30, name="n", seconds=2)
    params.enqueue_at(datetime.now(timezone.utc) + timedelta(hours=1), name="n", when="w")
    jobs.enqueue("issue10_params", name="m")
    docs = [json.loads(p) for p in r.lrange("worker:queue:default", 0, -1)]
    docs += [json.loads(p) for p in r.zrange("worker:scheduled", 0, -1)]
    kwargs = sorted((d["kwargs"] for d in docs), key=json.dumps)
    assert kwargs == sorted([{"name": "n"}, {"name": "n", "seconds": 2}, {"name": "n", "when": "w"},
                             {"name": "m"}], key=json.dumps)



# --- what an enqueue accepts: text cjson can read, queue names by the QUEUES rule ---

def test_lone_surrogate_is_refused_at_enqueue(r):
    """Origin: issue 10, adversarial review #5."""
    b = make_broker(r)
    with pytest.raises(ValueError, match="surrogate"):
        b.push("push", [os.fsdecode(b"caf\xe9.txt")], {}, queue="mail")
    with pytest.raises(ValueError, match="surrogate"):
        b.push_many("push", [["ok"], ["\ud83d"]])
    assert r.dbsize() == 0


def test_surrogate_pairs_and_nul_still_round_trip_through_the_schedule(r):
    """Emoji are escaped as surrogate pairs, which cjson reads: they must not be refused, nor moved to `default`.

    Origin: issue 10, adversarial review #5."""
    b = make_broker(r)
    args = ["\U0001F600 snow \u2603", "nul\u0000"]
    b.push("push", args, {}, queue="mail", due=time.time() - 1)
    job_id = b.push("push", args, {}, queue="mail", delay=0.001)
    deadline = time.monotonic() + 5
    while r.zcard("worker:scheduled") and time.monotonic() < deadline:
        b.cycle("mover:1")
        time.sleep(0.01)
    assert r.llen("worker:queue:mail") == 2 and not r.exists("worker:queue:default")
    assert json.loads(r.lindex("worker:queue:mail", 1)) ["id"] == job_id
    assert json.loads(r.lindex("worker:queue:mail", 1))["args"] == args


@pytest.mark.parametrize("queue", ["*", "a,b", "new\nline", "tab\there", "x" * 101, "é"])
def test_queue_names_follow_the_QUEUES_rule(r, cli, queue):
    """Origin: issue 10, adversarial review, producer-side hardening."""
    b = make_broker(r)
    with pytest.raises(ValueError, match="queue"):
        b.push("push", [], {}, queue=queue)
    if queue != "*":  # `pause` takes * for every queue
        out = cli("pause", "--queue", queue)
        assert out.returncode == 2, (out.stdout, out.stderr)
    assert r.dbsize() == 0


def test_queue_names_QUEUES_accepts_are_accepted(r):
    """Origin: issue 10, adversarial review, producer-side hardening."""
    b = make_broker(r)
    b.push("push", [], {}, queue="mail.high:2-x_y")
    assert r.llen("worker:queue:mail.high:2-x_y") == 1
