"""Regressions from a review of the runtime: each test names the defect it guards against."""
import json
import shutil
import signal
import subprocess

import pytest

from tests.support import seen_late_long_ago, wait_until
from worker.config import from_mapping, redact_url
from worker.fetch import Broker


def _broker(r, **env):
    url = "redis://{host}:{port}/{db}".format(**r.connection_pool.connection_kwargs)
    return Broker(r, from_mapping({"REDIS_URL": url, **env}))


def test_recovery_survives_unencodable_history_and_requeues_each_job_once(r):
    """cjson refuses to encode NaN: an error half-way through the recovery script kept its earlier writes and
    re-pushed the same jobs on every call."""
    b = _broker(r, MAX_ATTEMPTS="5")
    poison = '{"id":"p","name":"push","queue":"default","args":[],"kwargs":{},"errors":[{"at":NaN}]}'
    good = json.dumps({"id": "g", "name": "push", "queue": "default", "args": [], "kwargs": {}})
    r.zadd("worker:workers", {"dead:1": 0})
    r.rpush("worker:processing:dead:1", poison, good)
    seen_late_long_ago(r, "dead:1")
    assert sorted(b.recover()) == ["requeued:g", "requeued:p"]
    assert b.recover() == [] and b.recover() == []
    ids = sorted(json.loads(x.replace("NaN", "0"))["id"] for x in r.lrange("worker:queue:default", 0, -1))
    assert ids == ["g", "p"]


def test_recovery_without_a_queue_field_goes_to_default(r):
    b = _broker(r)
    r.zadd("worker:workers", {"dead:2": 0})
    r.rpush("worker:processing:dead:2", '{"id":"q","name":"push","args":[],"kwargs":{}}')
    seen_late_long_ago(r, "dead:2")
    assert b.recover() == ["requeued:q"]
    assert json.loads(r.lindex("worker:queue:default", 0))["id"] == "q"


@pytest.mark.timeout(60)
def test_nan_and_deeply_nested_payloads_are_failed_not_fatal(r, spawn):
    r.rpush("worker:queue:default",
            '{"id":"n1","name":"push","queue":"default","args":["out",NaN],"kwargs":{}}',
            '{"id":"d1","name":"push","args":' + "[" * 5000 + "]" * 5000 + ',"kwargs":{}}',
            json.dumps({"id": "ok", "name": "push", "args": ["out", "after"], "kwargs": {}}))
    w = spawn("--burst", JOB_RETRIES="2")
    assert w.wait(30) == 0, w.output
    assert r.lrange("out", 0, -1) == ["after"]
    assert r.zcard("worker:failed") == 2
    for rec in r.hvals("worker:failed:data"):
        assert json.loads(rec)["cause"] == "bad_payload"


@pytest.mark.timeout(60)
def test_usr1_while_idle_does_not_kill_the_next_job(r, cli, spawn):
    w = spawn(HEARTBEAT_INTERVAL="0.5")
    w.wait_for(r"event=worker.start")
    wait_until(lambda: r.zcard("worker:workers") == 1, 10, "registration")
    name = r.zrange("worker:workers", 0, 0)[0]
    # Wait for the worker to have taken the USR1, not for a guessed time: a USR2 sent after it (the kernel delivers
    # and Python runs pending handlers in signal-number order, USR1 first) shows up as state=paused, written by a
    # loop turn that had both; the CONT that follows is taken in a later turn, whose first step (slots.service)
    # consumes the USR1 before anything can be claimed.
    w.signal(signal.SIGUSR1)
    w.signal(signal.SIGUSR2)
    wait_until(lambda: r.hget(f"worker:worker:{name}", "state") == "paused", 10, "the paused state")
    w.signal(signal.SIGCONT)
    wait_until(lambda: r.hget(f"worker:worker:{name}", "state") == "idle", 10, "the idle state")
    assert cli("enqueue", "push", "--args", '["out", "survived"]').returncode == 0
    got = r.blpop("out", 15)
    assert got and got[1] == "survived", w.output
    assert r.zcard("worker:failed") == 0


@pytest.mark.timeout(60)
def test_a_usr2_paused_worker_keeps_its_heartbeat(r, spawn):
    w = spawn(HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="1.5")
    w.wait_for(r"event=worker.start")
    wait_until(lambda: r.zcard("worker:workers") == 1, 10, "registration")
    name = r.zrange("worker:workers", 0, 0)[0]
    w.signal(signal.SIGUSR2)
    wait_until(lambda: r.hget(f"worker:worker:{name}", "state") == "paused", 10, "paused state")
    for _ in range(4):  # well past HEARTBEAT_TTL
        sec, usec = r.time()
        now_ms = sec * 1000 + usec / 1000
        wait_until(lambda: float(r.hget(f"worker:worker:{name}", "seen")) > now_ms, 5, "a fresh heartbeat")
        # its score is its own deadline: a fresh beat puts it a whole TTL ahead of Redis's clock
        assert r.zscore("worker:workers", name) >= now_ms + 1500
    w.signal(signal.SIGTERM)
    assert w.wait(10) == 0


@pytest.mark.timeout(60)
def test_unix_socket_redis_url(tmp_path, env, cli):
    if not shutil.which("redis-server"):
        pytest.skip("redis-server missing")
    sock = tmp_path / "redis.sock"
    srv = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(sock), "--save", "",
                            "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        wait_until(sock.exists, 10, "the unix socket")
        res = cli("enqueue", "push", "--args", '["out", 1]', REDIS_URL=f"unix://{sock}")
        assert res.returncode == 0, res.stderr
        res = cli("--burst", REDIS_URL=f"unix://{sock}")
        assert res.returncode == 0 and "event=job.done" in res.stdout, res.stdout + res.stderr
    finally:
        srv.kill()
        srv.wait(10)


@pytest.mark.parametrize("url,secret", [
    ("redis://:p#ss@h:1/0", "p#ss"), ("redis://h:1/0?password=s3cret", "s3cret"),
    ("rediss://user:pa:ss@h", "pa:ss"), ("redis://secret@h", "secret"), ("redis://:a/b?c@h/0", "a/b?c")])
def test_redaction_hides_passwords_parsers_would_misread(url, secret):
    assert secret not in redact_url(url)
