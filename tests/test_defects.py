"""Regressions for issue 10 (adversarial review): #2, #4, #5, #6, #8 and the hardening items on the producer side.

Each test names the defect it guards against. Real redis-servers throughout; stalls are real (SIGSTOP of the server).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
import redis

import worker.config
from worker import client, jobs
from worker.failed import FailedRegistry
from worker.fetch import Broker

from tests.support import free_port, seen_late_long_ago, start_redis_server

WORKERS = "worker:workers"


def _url(r) -> str:
    return "redis://{host}:{port}/{db}".format(**r.connection_pool.connection_kwargs)


def _broker(r, **env) -> Broker:
    return Broker(r, worker.config.from_mapping({"REDIS_URL": _url(r), **env}))


def _job(job_id, queue="default", **extra) -> str:
    return json.dumps({"id": job_id, "name": "push", "queue": queue, "args": [], "kwargs": {}, **extra})


def _queued_ids(r, queue="default") -> list:
    return sorted(jobs.loose_id(p) for p in r.lrange(f"worker:queue:{queue}", 0, -1))


@pytest.fixture
def default_broker():
    """Restore the module-level enqueue broker after a test that sets it."""
    yield
    jobs.use(None)


# --- issue 15, blind spot 2: an outcome recorded twice (a call repeated after its reply was lost) ---

@pytest.mark.parametrize("op", ["ack", "fail", "retry", "requeue"])
def test_an_outcome_recorded_twice_takes_effect_once(r, op):
    """The supervisor re-sends its pending outcomes when a CYCLE call's reply is lost (the call may have run).
    "Only if the job is still ours" (LREM == 1) is what keeps at-least-once from becoming at-least-twice: the
    second copy must count nothing, push nothing, schedule nothing and record no second failure."""
    from worker.fetch import Outcome
    b = _broker(r)
    payload = _job("j1", attempts=0)
    r.rpush("worker:queue:default", payload, _job("behind"))
    (claim,) = b.cycle("w:1", claim=[0]).claims
    assert claim.payload == payload
    retried = _job("j1", attempts=1)
    outcome = {"ack": Outcome.ack(payload, 0),
               "fail": Outcome.fail(payload, "j1", {"id": "j1", "cause": "error", "payload": payload}, 0),
               "retry": Outcome.retry(payload, retried, 0.0, 0),  # due at once: moved to its queue by the call
               "requeue": Outcome.requeue(payload, "default", 0)}[op]
    first = b.cycle("w:1", [outcome])
    second = b.cycle("w:1", [outcome])  # the same call again, as after a lost reply
    assert first.held == second.held == 0 and r.llen("worker:processing:w:1") == 0
    assert int(r.get("worker:stat:processed") or 0) == (op == "ack")
    assert int(r.get("worker:stat:failed") or 0) == (op == "fail")
    assert r.zcard("worker:failed") == r.hlen("worker:failed:data") == (op == "fail")
    assert r.zcard("worker:scheduled") == 0
    behind = _job("behind")  # a requeue goes back to the head, a due retry to the tail: each exactly once
    expected = {"requeue": [payload, behind], "retry": [behind, retried]}.get(op, [behind])
    assert r.lrange("worker:queue:default", 0, -1) == expected


# --- #2: one hostile payload must not stop orphan recovery ---

HOSTILE_ATTEMPTS = ["1e400", "-1e400", "NaN", "1e300", "-3", "2.5", '"7"', "[]", "true"]


@pytest.mark.parametrize("attempts", HOSTILE_ATTEMPTS)
def test_hostile_attempts_do_not_stop_recovery_of_any_worker(r, attempts):
    """``"attempts": 1e400`` made RECOVER raise on cjson.encode(inf) after its first write: the dead worker was never
    removed, so its earlier items were pushed again on every pass, and later dead workers were never recovered."""
    b = _broker(r, MAX_ATTEMPTS="5")
    hostile = '{"id":"h","name":"push","queue":"default","args":[],"kwargs":{},"attempts":%s}' % attempts
    r.zadd(WORKERS, {"dead:1": 0, "dead:2": 1})
    # recovery walks a list from its tail: g2 is handled before the hostile entry, g1 after it
    r.rpush("worker:processing:dead:1", _job("g1"), hostile, _job("g2"))
    r.rpush("worker:processing:dead:2", _job("g3", queue="mail"))
    seen_late_long_ago(r, "dead:1", "dead:2")
    results = [b.recover() for _ in range(3)]
    assert results[1] == [] and results[2] == [], results
    assert _queued_ids(r, "mail") == ["g3"]
    queued = _queued_ids(r)
    failed = r.zrange("worker:failed", 0, -1)
    assert sorted(x for x in queued if x != "h") == ["g1", "g2"]
    assert queued.count("h") + failed.count("h") == 1, (queued, failed)
    assert r.zrange(WORKERS, 0, -1) == []
    assert not r.exists("worker:processing:dead:1", "worker:processing:dead:2")
    # whatever was written is valid JSON that the worker can read back
    for p in r.lrange("worker:queue:default", 0, -1):
        spec_doc = json.loads(p)
        assert isinstance(spec_doc["errors"], list)
    for rec in r.hvals("worker:failed:data"):
        assert json.loads(rec)["id"] == "h"


def test_recovery_survives_a_wake_key_of_the_wrong_type(r):
    """A payload names its queue, so it chooses the wake key RECOVER writes; a wrong-typed one must not abort it."""
    b = _broker(r)
    r.set("worker:wake:odd", "not a list")
    r.zadd(WORKERS, {"dead:1": 0, "dead:2": 1})
    r.rpush("worker:processing:dead:1", _job("g1"), _job("o", queue="odd"), _job("g2"))
    r.rpush("worker:processing:dead:2", _job("g3"))
    seen_late_long_ago(r, "dead:1", "dead:2")
    for _ in range(3):
        b.recover()
    assert _queued_ids(r) == ["g1", "g2", "g3"]
    assert _queued_ids(r, "odd") == ["o"]
    assert r.zrange(WORKERS, 0, -1) == []


def test_recovery_records_the_queue_of_a_payload_cjson_cannot_read(r):
    """#5: a lone surrogate escape defeats cjson; the failed record must still name the queue, or `failed retry`
    refuses to move it."""
    b = _broker(r)
    r.zadd(WORKERS, {"dead:1": 0})
    r.rpush("worker:processing:dead:1", '{"id":"s","name":"push","queue":"mail","args":["\\udce9"],"kwargs":{}}')
    seen_late_long_ago(r, "dead:1")
    assert len(b.recover()) == 1
    (rec,) = [json.loads(x) for x in r.hvals("worker:failed:data")]
    assert rec["queue"] == "mail"
    reg = FailedRegistry(b)
    assert reg.retry(reg.ids()) == [rec["id"]]
    assert r.llen("worker:queue:mail") == 1


# --- #4: an enqueue retried after a timeout must not enqueue twice ---

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
    b = _short_timeout_broker(redis_server, r)
    with Stall(redis_server.proc, 1.2):
        job_id = b.push("push", ["x", 1], {})
    assert _queued_ids(r) == [job_id]
    assert r.scard("worker:queues") == 1
    assert all(r.ttl(k) > 0 for k in r.keys("worker:enq:*")), "every dedupe key must expire"


@pytest.mark.timeout(60)
def test_enqueue_many_retried_after_a_stall_enqueues_once(r, redis_server):
    """The stall starts once the server has run the first batch of the pipeline (observed from another
    connection), so it hits the pipeline's own round trip, which redis-py re-sends whole after the timeout."""
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
    queued = _queued_ids(r)
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
    copy was moved to its queue before redis-py's re-sent ZADD scheduled it again, and the job ran twice."""
    proxy = LossyProxy(redis_server.port)
    try:
        cfg = worker.config.from_mapping({"REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0", "REDIS_TIMEOUT": "0.5"})
        b = Broker(client.connect(cfg, name="enqueue"), cfg)
        b.push("push", [], {}, queue="warmup", due=time.time() + 60)  # its script loaded, its connection open
        r.flushall()
        mover = _broker(r)
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
        assert _queued_ids(r) == ids
    finally:
        proxy.close()


def test_enqueue_many_in_batches_enqueues_each_job_once(r, redis_server):
    """Deduplication is per batch call (its first job's id): batches of one enqueue_many must not shadow each other.
    (Its speed is measured by the throughput benchmark, not asserted here.)"""
    b = _broker(r)
    calls = [["x", i] for i in range(40000)]
    ids = b.push_many("push", calls)
    assert r.llen("worker:queue:default") == len(calls) == len(set(ids))
    assert [json.loads(p)["args"][1] for p in r.lrange("worker:queue:default", 0, -1)] == list(range(40000))


# --- hardening: enqueue_in uses the Redis clock ---

def test_enqueue_in_uses_the_redis_clock(r, monkeypatch):
    b = _broker(r)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # the producer's clock runs an hour ahead
    b.push("push", ["x", 1], {}, delay=5)
    monkeypatch.setattr(time, "time", real)
    sec, usec = r.time()
    now_ms = sec * 1000 + usec // 1000
    (score,) = [s for _, s in r.zrange("worker:scheduled", 0, -1, withscores=True)]
    assert now_ms + 3000 < score <= now_ms + 5000


def test_enqueue_at_in_the_past_is_queued_at_once(r):
    b = _broker(r)
    job_id = b.push("push", ["x", 1], {}, due=time.time() - 60)
    assert _queued_ids(r) == [job_id] and r.zcard("worker:scheduled") == 0


# --- #5: lone surrogates are refused at enqueue (cjson cannot read them) ---

def test_lone_surrogate_is_refused_at_enqueue(r):
    b = _broker(r)
    with pytest.raises(ValueError, match="surrogate"):
        b.push("push", [os.fsdecode(b"caf\xe9.txt")], {}, queue="mail")
    with pytest.raises(ValueError, match="surrogate"):
        b.push_many("push", [["ok"], ["\ud83d"]])
    assert r.dbsize() == 0


def test_surrogate_pairs_and_nul_still_round_trip_through_the_schedule(r):
    """Emoji are escaped as surrogate pairs, which cjson reads: they must not be refused, nor moved to `default`."""
    b = _broker(r)
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


# --- #6: READONLY after a failover drops the connection and reconnects ---

def _server_on_socket(tmp_path, name, port=0):
    """A redis-server listening on a Unix socket (and on TCP ``port`` unless 0)."""
    sock = str(tmp_path / f"{name}.sock")
    proc = subprocess.Popen(
        [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--unixsocket", sock,
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path), "--loglevel", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c = redis.Redis(unix_socket_path=sock, decode_responses=True)
    deadline = time.monotonic() + 10
    while True:
        try:
            c.ping()
            return proc, sock, c
        except redis.ConnectionError:
            assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
            time.sleep(0.02)


@pytest.mark.timeout(60)
def test_readonly_after_failover_reconnects(tmp_path):
    """DNS-style failover: the name the worker connects to now leads to the new primary, and the node it is still
    connected to became a replica. ReadOnlyError must drop the connection so the next attempt reconnects (before,
    every later call failed with READONLY on the same connection)."""
    a_proc, a_sock, a = _server_on_socket(tmp_path, "a")
    b_port = free_port()
    b_proc, b_sock, b = _server_on_socket(tmp_path, "b", port=b_port)
    try:
        link = tmp_path / "redis.sock"  # the "DNS name": a symlink we can point at either server
        os.symlink(a_sock, link)
        cfg = worker.config.from_mapping({"REDIS_URL": f"unix://{link}", "REDIS_TIMEOUT": "2"})
        broker = Broker(client.connect(cfg), cfg)
        broker.heartbeat("w:1")  # connected to A, the primary
        assert a.zrange(WORKERS, 0, -1) == ["w:1"]
        # failover: A becomes a replica of B, and the name now leads to B
        a.replicaof("127.0.0.1", b_port)
        with pytest.raises(redis.ReadOnlyError):
            a.set("probe", "1")
        tmp = tmp_path / "redis.sock.new"
        os.symlink(b_sock, tmp)
        os.replace(tmp, link)
        broker.heartbeat("w:1")
        broker.push("push", ["x", 1], {})
        assert b.zrange(WORKERS, 0, -1) == ["w:1"]
        assert b.llen("worker:queue:default") == 1
    finally:
        for p in (a_proc, b_proc):
            p.kill()
            p.wait(10)


def test_readonly_error_drops_the_connection_even_without_retries(tmp_path):
    a_proc, a_sock, a = _server_on_socket(tmp_path, "a")
    b_port = free_port()
    b_proc = start_redis_server(b_port, tmp_path)
    try:
        cfg = worker.config.from_mapping({"REDIS_URL": f"unix://{a_sock}"})
        rc = client.connect(cfg, retries=0)
        rc.set("k", "1")
        first = rc.client_id()
        a.replicaof("127.0.0.1", b_port)
        with pytest.raises(redis.ReadOnlyError):
            rc.set("k", "2")
        assert rc.client_id() != first, "the connection that got READONLY must be dropped"
    finally:
        for p in (a_proc, b_proc):
            p.kill()
            p.wait(10)


# --- #8: small ones ---

def _store_failed(r, n=3, message="boom"):
    for i in range(n):
        rec = {"id": f"f{i}", "name": "push", "queue": "default", "payload": _job(f"f{i}"), "cause": "error",
               "type": "ValueError", "message": message, "traceback": "", "worker": "w", "attempts": 1,
               "failed_at": time.time(), "history": []}
        r.zadd("worker:failed", {f"f{i}": time.time() * 1000 + i})  # now: older records are past FAILED_TTL
        r.hset("worker:failed:data", f"f{i}", json.dumps(rec))


def test_failed_limit_zero_and_negative(r, cli):
    _store_failed(r, 3)
    out = cli("failed", "--json", "--limit", "0")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["jobs"] == []
    out = cli("failed", "--json", "--limit", "2")
    assert [j["id"] for j in json.loads(out.stdout)["jobs"]] == ["f2", "f1"]
    out = cli("failed", "--limit", "-1")
    assert out.returncode == 2 and "--limit" in out.stderr, (out.stdout, out.stderr)
    reg = FailedRegistry(_broker(r))
    assert reg.list(0) == [] and reg.ids(0) == []
    with pytest.raises(ValueError):
        reg.list(-1)


def test_failed_list_with_a_surrogate_message_on_strict_utf8_stdout(r, cli):
    _store_failed(r, 1)
    rec = json.loads(r.hget("worker:failed:data", "f0"))
    rec["message"] = "cannot open caf\udce9.txt"
    r.hset("worker:failed:data", "f0", json.dumps(rec))
    out = cli("failed", PYTHONIOENCODING="utf-8:strict")
    assert out.returncode == 0, out.stderr
    assert "caf\\udce9.txt" in out.stdout


@pytest.mark.parametrize("delay", ["nan", "inf", "-1", "-inf"])
def test_enqueue_in_rejects_non_finite_or_negative_delays(r, cli, delay):
    out = cli("enqueue", "noop", f"--in={delay}")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "--in" in out.stderr and "finite" in out.stderr
    assert r.dbsize() == 0


def test_enqueue_in_api_rejects_nan(r, default_broker):
    jobs.use(_broker(r))
    with pytest.raises(ValueError):
        jobs.enqueue_in(float("nan"), "noop")
    assert r.dbsize() == 0


def test_job_parameters_named_name_seconds_when(r, default_broker):
    from datetime import datetime, timedelta, timezone

    @jobs.job(name="issue10_params")
    def params(name, seconds=0, when=None):
        return name

    jobs.use(_broker(r))
    params.enqueue(name="n")
    params.enqueue_in(30, name="n", seconds=2)
    params.enqueue_at(datetime.now(timezone.utc) + timedelta(hours=1), name="n", when="w")
    jobs.enqueue("issue10_params", name="m")
    docs = [json.loads(p) for p in r.lrange("worker:queue:default", 0, -1)]
    docs += [json.loads(p) for p in r.zrange("worker:scheduled", 0, -1)]
    kwargs = sorted((d["kwargs"] for d in docs), key=json.dumps)
    assert kwargs == sorted([{"name": "n"}, {"name": "n", "seconds": 2}, {"name": "n", "when": "w"},
                             {"name": "m"}], key=json.dumps)


# --- hardening: queue names, maxmemory-policy ---

@pytest.mark.parametrize("queue", ["*", "a,b", "new\nline", "tab\there", "x" * 101, "é"])
def test_queue_names_follow_the_QUEUES_rule(r, cli, queue):
    b = _broker(r)
    with pytest.raises(ValueError, match="queue"):
        b.push("push", [], {}, queue=queue)
    if queue != "*":  # `pause` takes * for every queue
        out = cli("pause", "--queue", queue)
        assert out.returncode == 2, (out.stdout, out.stderr)
    assert r.dbsize() == 0


def test_queue_names_QUEUES_accepts_are_accepted(r):
    b = _broker(r)
    b.push("push", [], {}, queue="mail.high:2-x_y")
    assert r.llen("worker:queue:mail.high:2-x_y") == 1


def test_check_server_warns_about_eviction(r):
    b = _broker(r)
    assert b.check_server() is None
    r.config_set("maxmemory-policy", "allkeys-lru")
    try:
        warning = b.check_server()
    finally:
        r.config_set("maxmemory-policy", "noeviction")
    assert warning and "allkeys-lru" in warning and "noeviction" in warning


@pytest.mark.parametrize("bad", ["workers", "worker_hash"])
def test_an_outcome_beside_a_wrong_typed_bookkeeping_key_loses_no_job(r, bad):
    """Chaos review of the lean CYCLE: its first write is now the outcome's LREM, so nothing after it may raise on
    a key of the wrong type. A ``P:workers`` that is not a zset (the beat's ZADD) or a worker hash that is not a hash
    (a checkpoint's HSET) made the call fail after the job had left the processing list: it was in no list at all.
    Whatever else the call does with such keys, the job is either still claimed or back in its queue."""
    from worker.fetch import Outcome
    b = _broker(r)
    job_id = b.push("push", ["out", "x"], {})
    (claim,) = b.cycle("w:1", [], [0], 0, "").claims
    key = WORKERS if bad == "workers" else "worker:worker:w:1"
    r.delete(key)
    r.set(key, "corrupt")
    try:
        b.cycle("w:1", [Outcome.requeue(claim.payload, "default", 0)], (), 0, "stopping",
                checkpoints=[(0, '{"step":1}')], beat=True)
    except redis.ResponseError:
        pass  # a call may still fail on such a key, after its outcome took effect
    held = r.lrange("worker:processing:w:1", 0, -1) + r.lrange("worker:queue:default", 0, -1)
    assert [jobs.loose_id(p) for p in held] == [job_id]
