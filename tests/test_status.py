"""``python -m worker status [--json]`` and ``pause``/``resume`` (worker/status.py) against the real Redis, with real
workers: queued, running, failed, scheduled and paused work, checked field by field; a hostile queue head (a
400-digit ``enqueued_at``) shows as an unknown latency and stops neither status nor the metrics sampler."""
import json
import socket

import pytest
import redis

from tests.support import still_works, wait_until
from worker import config, status
from worker.keys import Keys

K = Keys("worker")
MODULES = "worker.sample,tests.jobs"
SCHEMA_KEYS = {"schema", "time", "paused", "queues", "workers", "failed", "scheduled", "totals", "schedules",
               "throughput", "skipped"}
QUEUE_KEYS = {"name", "depth", "latency", "paused"}
WORKER_KEYS = {"name", "dyno", "host", "pid", "queues", "started", "state", "job", "heartbeat_age", "concurrency",
               "slots"}
JOB_KEYS = {"id", "name", "queue", "running_for"}


def status_json(cli, **env):
    res = cli("status", "--json", **env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def table(text: str, header: str) -> dict:
    """Rows of the human table whose header line starts with ``header``, keyed by their first cell."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    cols = lines[start].split()
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        cells = line.split()
        assert len(cells) == len(cols), f"misaligned row {line!r} under {lines[start]!r}"
        rows[cells[0]] = dict(zip(cols, cells))
    return rows


@pytest.mark.timeout(90)
def test_status_shows_queued_running_failed_scheduled_and_paused_work(r, cli, spawn):
    # One done and one failed job, through a burst worker that then exits (totals and the failed registry).
    assert cli("enqueue", "fail").returncode == 0
    assert cli("enqueue", "push", "--args", '["done", 1]').returncode == 0
    assert spawn("--burst").wait(30) == 0
    # A worker busy on a long job in queue "slow", identified as a Heroku dyno.
    w = spawn(QUEUES="slow", DYNO="worker.1")
    job_id = cli("enqueue", "term_probe", "--args", '["probe", 60]', "--queue", "slow").stdout.strip()
    assert json.loads(r.blpop("probe", 15)[1])["event"] == "started"
    # Waiting work: a job enqueued 1000 s ago (Redis clock) at the head of "default", then a fresh one behind it.
    old = int(r.time()[0]) - 1000
    r.rpush(K.queue("default"), json.dumps({"id": "0" * 32, "name": "push", "queue": "default",
                                            "args": ["never", 1], "kwargs": {}, "enqueued_at": old, "attempts": 0}))
    assert cli("enqueue", "push", "--args", '["never", 2]').returncode == 0
    r.rpush(K.queue("junk"), "not json")  # an unreadable head: latency unknown, not an error
    r.sadd(K.queues, "junk")
    assert cli("enqueue", "push", "--args", '["later", 1]', "--in", "3600").returncode == 0
    assert cli("pause", "--queue", "default").returncode == 0

    doc = status_json(cli)
    assert set(doc) == SCHEMA_KEYS and doc["schema"] == 1
    assert abs(doc["time"] - float(r.time()[0])) < 30
    assert doc["paused"] == ["default"]
    queues = {q["name"]: q for q in doc["queues"]}
    assert list(queues) == ["default", "junk", "slow"]
    assert all(set(q) == QUEUE_KEYS for q in doc["queues"])
    assert queues["default"]["depth"] == 2 and queues["default"]["paused"] is True
    assert 1000 <= queues["default"]["latency"] < 1100
    assert queues["junk"] == {"name": "junk", "depth": 1, "latency": None, "paused": False}
    assert queues["slow"] == {"name": "slow", "depth": 0, "latency": 0.0, "paused": False}
    [wk] = doc["workers"]
    assert set(wk) == WORKER_KEYS and set(wk["job"]) == JOB_KEYS
    assert wk["name"] == f"worker.1:{w.pid}" and wk["dyno"] == "worker.1" and wk["pid"] == w.pid
    assert wk["host"] == socket.gethostname() and wk["queues"] == ["slow"]
    assert wk["state"] == "busy"
    assert wk["job"]["id"] == job_id and wk["job"]["name"] == "term_probe" and wk["job"]["queue"] == "slow"
    assert wk["concurrency"] == 1 and wk["slots"] == [{"slot": 0, "job": wk["job"], "checkpoint": None}]
    assert 0 <= wk["job"]["running_for"] < 60
    assert 0 <= wk["heartbeat_age"] < 30
    assert doc["failed"] == 1 and doc["scheduled"] == 1
    assert doc["totals"] == {"processed": 1, "failed": 1}

    res = cli("status")
    assert res.returncode == 0, res.stderr
    qrows = table(res.stdout, "QUEUE")
    assert qrows["default"]["DEPTH"] == "2" and qrows["default"]["PAUSED"] == "yes"
    assert qrows["default"]["LATENCY"].startswith("16m")  # 1000 s = 16m40s, plus the test's own seconds
    assert qrows["junk"]["LATENCY"] == "?" and qrows["slow"]["LATENCY"] == "-" and qrows["slow"]["PAUSED"] == "no"
    wrow = table(res.stdout, "WORKER")[f"worker.1:{w.pid}"]
    assert (wrow["STATE"], wrow["JOB"], wrow["ID"], wrow["QUEUES"]) == ("busy", "term_probe", job_id[:8], "slow")
    assert table(res.stdout, "FAILED")["1"] == {"FAILED": "1", "SCHEDULED": "1", "PROCESSED_TOTAL": "1",
                                                "FAILED_TOTAL": "1"}


def test_stale_heartbeat_shows_dead_and_partial_records_do_not_break_status(r, redis_server):
    now_ms = int(r.time()[0]) * 1000
    r.zadd(K.workers, {"ghost:1": now_ms - 60_000, "fresh:2": now_ms, "bare:3": now_ms})
    r.hset(K.worker("ghost:1"), mapping={"state": "busy", "job": "{truncated", "job_started": now_ms - 61_000,
                                         "pid": "1", "host": "h"})
    r.hset(K.worker("fresh:2"), mapping={"state": "idle", "job": "", "pid": "x", "queues": "a,b"})
    cfg = config.from_mapping({"REDIS_URL": redis_server.url, "HEARTBEAT_TTL": "30"})
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    doc = {w["name"]: w for w in status.collect(client, cfg)["workers"]}
    client.close()
    assert doc["ghost:1"]["state"] == "dead" and 59 <= doc["ghost:1"]["heartbeat_age"] < 90
    assert doc["ghost:1"]["job"]["id"] is None and 60 <= doc["ghost:1"]["job"]["running_for"] < 90
    assert doc["fresh:2"]["state"] == "idle" and doc["fresh:2"]["job"] is None and doc["fresh:2"]["pid"] is None
    assert doc["fresh:2"]["queues"] == ["a", "b"]
    assert doc["bare:3"]["state"] == "unknown" and doc["bare:3"]["host"] is None


@pytest.mark.timeout(90)
def test_pause_is_observed_by_a_running_worker_and_resume_restarts_it(r, cli, spawn, redis_server):
    w = spawn(QUEUES="default")
    assert cli("enqueue", "push", "--args", '["out", "before"]').returncode == 0
    assert r.blpop("out", 15)[1] == "before"  # the worker is up and claiming

    res = cli("pause", "--queue", "default")
    assert res.returncode == 0 and res.stdout.strip() == "paused queue default", res.stdout + res.stderr
    cfg = config.from_mapping({"REDIS_URL": redis_server.url})

    def worker_state():
        return {x["name"]: x["state"] for x in status.collect(r, cfg)["workers"]}.get(f"{socket.gethostname()}:{w.pid}")

    wait_until(lambda: worker_state() == "paused", what="worker state paused")
    job_id = cli("enqueue", "push", "--args", '["out", "after"]').stdout.strip()
    # Not running it is the behaviour under test, so a bounded wait for the job's event is the check itself.
    assert r.blpop("out", 2.5) is None, "a paused queue was claimed from"
    assert [json.loads(p)["id"] for p in r.lrange(K.queue("default"), 0, -1)] == [job_id]
    assert w.popen.poll() is None and worker_state() == "paused"

    res = cli("resume", "--queue", "default")
    assert res.returncode == 0 and res.stdout.strip() == "resumed queue default", res.stdout + res.stderr
    assert r.blpop("out", 15)[1] == "after"
    assert r.llen(K.queue("default")) == 0
    wait_until(lambda: worker_state() == "idle", what="worker state idle again")


def test_pause_and_resume_edit_the_paused_set_and_ring_each_wake_list_once(r, cli):
    r.sadd(K.queues, "a", "b")
    assert cli("pause").stdout.strip() == "paused every queue"
    assert r.smembers(K.paused) == {"*"}
    assert cli("pause").stdout.strip() == "every queue was already paused: nothing changed"
    doc = status_json(cli)
    assert doc["paused"] == ["*"] and [(q["name"], q["paused"]) for q in doc["queues"]] == [
        ("a", True), ("b", True), ("default", True)]  # "default": configured QUEUES, listed though never used
    assert "ALL QUEUES PAUSED" in cli("status").stdout
    assert cli("pause", "--queue", "a").stdout.strip() == "paused queue a"
    assert cli("resume", "--queue", "b").stdout.strip() == "queue b was not paused: nothing changed " \
                                                           "(still paused: *,a)"
    assert cli("resume").stdout.strip() == "resumed every queue", "plain resume clears named pauses too"
    assert r.smembers(K.paused) == set()
    assert r.lrange(K.wake("a"), 0, -1) == ["1"] and r.lrange(K.wake("b"), 0, -1) == ["1"]
    assert cli("pause", "--queue", "a").stdout.strip() == "paused queue a"
    assert cli("resume", "--queue", "a").stdout.strip() == "resumed queue a"
    assert r.lrange(K.wake("a"), 0, -1) == ["1"], "a wake list holds one token at most"
    assert cli("resume", "--queue", "a").stdout.strip() == "queue a was not paused: nothing changed"
    assert cli("resume", "--queue", "c").stdout.strip() == "queue c was not paused: nothing changed " \
                                                           "(not yet known to Redis)"
    assert r.lrange(K.wake("c"), 0, -1) == ["1"]
    assert r.smembers(K.paused) == set()
    res = cli("pause", "--queue", "has space")
    assert res.returncode == 2 and "invalid queue name" in res.stderr and not r.exists(K.paused)


def test_the_redis_password_is_never_shown(r, cli, redis_server):
    r.config_set("requirepass", "s3cretpw")
    admin = redis.Redis(port=redis_server.port, password="s3cretpw")
    try:
        url = f"redis://:s3cretpw@127.0.0.1:{redis_server.port}/0"
        for args in (("status",), ("status", "--json"), ("pause", "--queue", "q"), ("resume", "--queue", "q")):
            res = cli(*args, REDIS_URL=url)
            assert res.returncode == 0, res.stderr
            assert "s3cretpw" not in res.stdout + res.stderr
        assert "redis://:***@127.0.0.1" in cli("status", REDIS_URL=url).stdout
        bad = cli("status", REDIS_URL=url.replace("s3cretpw", "wrongpw"))
        assert bad.returncode == 1 and "wrongpw" not in bad.stdout + bad.stderr and ":***@" in bad.stderr
    finally:
        admin.config_set("requirepass", "")
        admin.close()


def _failed_record(r, job_id, age_ms, **extra):
    now_ms = int(r.time()[0]) * 1000
    rec = {"id": job_id, "name": "boom", "queue": "default", "payload": "{}", "cause": "error", "type": "ValueError",
           "message": "m", "traceback": "", "attempts": 1, "failed_at": (now_ms - age_ms) / 1000, **extra}
    r.zadd(K.failed, {job_id: now_ms - age_ms})
    r.hset(K.failed_data, job_id, json.dumps(rec))


def test_failed_ttl_is_applied_on_read_by_status_and_failed_list(r, cli):
    """issue 27 item 8: FAILED_TTL held only when a new failure arrived; now every read (and every worker's
    housekeeping, next test) trims the records past it."""
    _failed_record(r, "old1", 60_000)
    _failed_record(r, "old2", 60_000)
    _failed_record(r, "new1", 0)
    res = cli("failed", "list", "--json", FAILED_TTL="30")
    assert res.returncode == 0, res.stderr
    assert [j["id"] for j in json.loads(res.stdout)["jobs"]] == ["new1"]
    assert r.zrange(K.failed, 0, -1) == ["new1"] and r.hkeys(K.failed_data) == ["new1"]
    _failed_record(r, "old3", 60_000)
    assert status_json(cli, FAILED_TTL="30")["failed"] == 1 and not r.hexists(K.failed_data, "old3")


@pytest.mark.timeout(60)
def test_a_running_worker_trims_failed_records_past_failed_ttl(r, spawn):
    """issue 27 item 8: with no reader at all, the workers' housekeeping keeps the documented bound."""
    _failed_record(r, "stale", 60_000)
    w = spawn(FAILED_TTL="30")
    w.wait_for(r"event=failed\.trimmed count=1")
    assert r.zcard(K.failed) == 0 and r.hlen(K.failed_data) == 0
    w.signal(15)
    assert w.wait(15) == 0


def test_junk_records_are_skipped_and_named_by_status_and_failed(r, cli):
    """issue 27 item 9: a non-string id in a worker's job:<slot>, a non-JSON failed record: status (human) and
    failed list/show printed a traceback; now they show the rest and say what they skipped."""
    now_ms = int(r.time()[0]) * 1000
    r.zadd(K.workers, {"odd:1": now_ms + 30_000})
    r.hset(K.worker("odd:1"), mapping={"state": "busy", "job:0": json.dumps({"id": 5, "name": ["x"]}),
                                       "job:1": "[1, 2]", "job:x": "{}", "started:0": now_ms, "ttl": 30000})
    _failed_record(r, "good", 0)
    r.zadd(K.failed, {"junk": now_ms})
    r.hset(K.failed_data, "junk", "not json{")
    res = cli("status")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "skipped: worker odd:1 slot 1: unreadable job payload" in res.stdout
    slots = status_json(cli)["workers"][0]["slots"]
    assert [s["job"]["id"] for s in slots] == [None, "5", None] and slots[1]["job"]["name"] is None
    res = cli("failed", "list")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "good" in res.stdout and "skipped: failed record 'junk': not a JSON object" in res.stdout
    res = cli("failed", "show", "junk")
    assert res.returncode == 1 and "not a JSON object" in res.stderr and "Traceback" not in res.stderr


def test_job_prints_iso_utc_times_and_durations(r, cli):
    """issue 21: `job ID` printed raw epoch floats."""
    r.hset(K.job("j1"), mapping={"status": "done", "name": "n", "queue": "default", "enqueued_at": 1700000000000,
                                 "started_at": 1700000002500, "ended_at": 1700000065000, "result": "1"})
    res = cli("job", "j1")
    assert res.returncode == 0, res.stderr
    rows = dict(line.split(None, 1) for line in res.stdout.splitlines())
    assert rows["enqueued_at"] == "2023-11-14T22:13:20.000Z" and rows["started_at"] == "2023-11-14T22:13:22.500Z"
    assert rows["waited"] == "2.5s" and rows["ran"] == "1m02s"


# --- a hostile queue head ---

HUGE = '{"id":"x","name":"noop","queue":"other","args":[],"kwargs":{},"enqueued_at":1' + "0" * 400 + "}"


@pytest.mark.timeout(40)
def test_huge_enqueued_at_crashes_neither_the_metrics_sampler_nor_status(r, spawn, cli, enqueue):
    """Origin: core review (9a4b9fe), #1."""
    r.rpush("worker:queue:other", HUGE)
    r.sadd("worker:queues", "other")
    w = spawn(JOB_MODULES=MODULES, QUEUES="default", METRICS_INTERVAL=1)
    w.wait_for(r"event=worker\.start")
    w.wait_for(r"event=metrics ", timeout=10)  # a sample taken with the bad head in view (the sampler ran)
    still_works(r, w, enqueue, "huge")
    res = cli("status")
    assert res.returncode == 0, res.stdout + res.stderr
    row = next((line for line in res.stdout.splitlines() if line.split()[:1] == ["other"]), None)
    assert row is not None and row.split()[1:3] == ["1", "?"], res.stdout  # depth 1, latency unknown
    res = cli("status", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    (q,) = [q for q in json.loads(res.stdout)["queues"] if q["name"] == "other"]
    assert q["depth"] == 1 and q["latency"] is None, q
    assert w.popen.poll() is None, w.output
