"""Core behaviour against a real redis-server and real forks: enqueue, claim/ack, queue priority, every crash path,
malformed entries (NaN, deep nesting, oversized: failed with a reason, never fatal), burst and long-running modes,
the Procfile command, the child's silence towards Redis, and outcomes (CYCLE) that take effect once: a call repeated
after a lost reply, or beside a bookkeeping key of the wrong type.

Workers are real `python -m worker` processes; tests synchronise on Redis state (job events, counters) or log lines.
"""
from __future__ import annotations

import json
import re
import shlex
import signal
from pathlib import Path

import pytest
import redis

import tests.jobs  # noqa: F401 - registers the test jobs in this process too (for enqueue through the Python API)
import worker
from tests.conftest import PYTHON, REPO
from tests.support import home, job_json, keys_of, make_broker, processing, still_works, wait_until
from worker import jobs
from worker.fetch import Broker

pytestmark = pytest.mark.both_backends  # each test on the single redis-server and on the local Redis Cluster

MODULES = "worker.sample,tests.jobs"

HEX32 = re.compile(r"^[0-9a-f]{32}$")


def logged(value: str) -> str:
    """A regex for ``value`` as the log writes it (logfmt: ``{worker}:paused`` is quoted)."""
    from worker.log import _value
    return re.escape(_value(value))


@pytest.fixture
def broker(r, backend):
    """The runtime's own producer side, on the test client: enqueue in-process without the CLI."""
    b = Broker(r, backend.config())
    yield b
    jobs.use(None)


def leftovers(r) -> list:
    """Claimed-but-unacknowledged jobs: must be none once a worker is done."""
    return [(key, r.lrange(key, 0, -1)) for key in r.keys(keys_of(r).processing("*"))]


def failed_records(r) -> dict:
    return {job_id: json.loads(v) for job_id, v in r.hgetall(keys_of(r).failed_data).items()}


# --- enqueue ---

def test_cli_enqueue_prints_id_of_queued_job(r, k, cli):
    res = cli("enqueue", "push", "--args", '["out", "v"]')
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()
    assert HEX32.match(job_id), res.stdout
    (payload,) = r.lrange(k.queue("default"), 0, -1)
    doc = json.loads(payload)
    assert (doc["id"], doc["name"], doc["args"], doc["kwargs"]) == (job_id, "push", ["out", "v"], {})


def test_cli_enqueue_unregistered_name(r, k, cli):
    res = cli("enqueue", "no_such_job_core")
    assert res.returncode == 2
    assert "no_such_job_core" in res.stderr and "not registered" in res.stderr, res.stderr
    assert r.keys(k.queue("*")) == []


@pytest.mark.parametrize("bad", ['{"a": 1}', "not json", '"x"', "3"])
def test_cli_enqueue_args_must_be_json_array(r, k, cli, bad):
    res = cli("enqueue", "push", "--args", bad)
    assert res.returncode == 2, res.stdout
    assert "--args" in res.stderr, res.stderr
    assert r.keys(k.queue("*")) == []


def test_python_enqueue_refuses_non_json_arguments(r, k, broker):
    jobs.use(broker)
    for bad in (object(), {1, 2}, float("nan")):
        with pytest.raises(TypeError):
            worker.enqueue("push", "k", bad)
    with pytest.raises(TypeError):
        tests.jobs.push.enqueue("k", b"bytes")
    assert r.llen(k.queue("default")) == 0
    # Control: the same path accepts JSON arguments, so the refusals above were about the arguments.
    assert HEX32.match(worker.enqueue("push", "k", {"nested": [1, 2.5, None]}))
    assert r.llen(k.queue("default")) == 1


# --- claim, ack, order ---

@pytest.mark.timeout(60)
def test_burst_drain_acks_everything(r, k, broker, spawn):
    for i in range(20):
        broker.push("push", ["out", i], {})
    w = spawn("--burst")
    assert w.wait(45) == 0, w.output
    assert r.lrange("out", 0, -1) == [str(i) for i in range(20)]
    assert leftovers(r) == []
    assert r.get(k.processed) == "20"
    assert r.zcard(k.workers) == 0  # a clean exit unregisters
    assert "reason=burst" in w.output


@pytest.mark.timeout(30)
def test_burst_exits_0_when_queues_are_empty(r, spawn):
    w = spawn("--burst")
    assert w.wait(20) == 0, w.output
    assert "event=worker.exit" in w.output


@pytest.mark.timeout(60)
def test_queues_are_tried_in_priority_order(r, broker, spawn):
    # Interleaved enqueue: only the worker's QUEUES order can put every `high` job first.
    for i in range(3):
        broker.push("push", ["order", f"low-{i}"], {}, queue="low")
        broker.push("push", ["order", f"high-{i}"], {}, queue="high")
    w = spawn("--burst", QUEUES="high,low")
    assert w.wait(45) == 0, w.output
    assert r.lrange("order", 0, -1) == ["high-0", "high-1", "high-2", "low-0", "low-1", "low-2"]
    assert leftovers(r) == []


@pytest.mark.timeout(60)
def test_star_takes_every_queue_in_name_order(r, k, broker, spawn):
    for q in ("zeta", "default", "alpha"):
        for i in range(2):
            broker.push("push", ["order", f"{q}-{i}"], {}, queue=q)
    w = spawn("--burst", QUEUES="*")
    assert w.wait(45) == 0, w.output
    assert r.lrange("order", 0, -1) == ["alpha-0", "alpha-1", "default-0", "default-1", "zeta-0", "zeta-1"]
    assert [key for key in r.keys(k.queue("*")) if r.llen(key)] == []


# --- failures: recorded with their cause, and the worker carries on ---

CRASHES = [
    pytest.param("fail", ["boom-core"], "error", "boom-core", id="exception"),
    pytest.param("exit_with", [3], "crash", "code 3", id="os-exit-3"),
    pytest.param("kill_self", ["SIGKILL"], "crash", "SIGKILL", id="sigkill"),
    pytest.param("segfault", [], "crash", "SIGSEGV", id="sigsegv"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name,args,cause,message", CRASHES)
def test_crash_is_recorded_and_worker_continues(r, k, broker, spawn, name, args, cause, message):
    bad_id = broker.push(name, args, {})
    broker.push("push", ["after", "next"], {})
    w = spawn("--burst")
    assert w.wait(45) == 0, w.output
    assert r.lrange("after", 0, -1) == ["next"], w.output
    records = failed_records(r)
    assert set(records) == {bad_id}
    rec = records[bad_id]
    assert rec["cause"] == cause, rec
    assert message in rec["message"], rec
    assert rec["name"] == name and rec["queue"] == "default" and json.loads(rec["payload"])["id"] == bad_id
    assert r.zscore(k.failed, bad_id) is not None
    assert (r.get(k.failed_count), r.get(k.processed)) == ("1", "1")
    assert leftovers(r) == []


@pytest.mark.timeout(60)
def test_exception_record_has_type_message_traceback(r, broker, spawn):
    job_id = broker.push("fail", ["boom-tb"], {})
    w = spawn("--burst")
    assert w.wait(45) == 0, w.output
    rec = failed_records(r)[job_id]
    assert (rec["type"], rec["message"]) == ("ValueError", "boom-tb")
    assert "Traceback (most recent call last)" in rec["traceback"]
    assert "ValueError: boom-tb" in rec["traceback"] and "jobs.py" in rec["traceback"]


BAD_ENTRIES = [
    ("this is not json", "not valid JSON"),
    ("[1, 2, 3]", "expected an object"),
    ('{"id": "core-noname", "args": [], "kwargs": {}}', "'name'"),
    ('{"id": "core-noargs", "name": "push", "kwargs": {}}', "'args'"),
    ('{"id": "core-unreg", "name": "no_such_job_core", "args": [], "kwargs": {}}', "not registered"),
    ('{"id": "core-arity", "name": "push", "args": [1, 2, 3], "kwargs": {}}', "do not fit"),
    ('{"id": "core-kwarg", "name": "push", "args": ["k"], "kwargs": {"nope": 1}}', "do not fit"),
]


@pytest.mark.timeout(60)
def test_malformed_entries_fail_with_reason_and_worker_continues(r, k, broker, spawn):
    # Pushed raw, as a buggy producer in another language might; then one good job behind them.
    for raw, _ in BAD_ENTRIES:
        r.rpush(k.queue("default"), raw)
    broker.push("push", ["after", "ok"], {})
    w = spawn("--burst", UNKNOWN_JOB_GRACE="0")  # an unregistered name fails at once (a grace: test_retries)
    assert w.wait(45) == 0, w.output
    assert r.lrange("after", 0, -1) == ["ok"], w.output
    by_payload = {rec["payload"]: rec for rec in failed_records(r).values()}
    for raw, reason in BAD_ENTRIES:
        rec = by_payload.get(raw)
        assert rec is not None, f"no failure recorded for {raw!r}: {list(by_payload)}"
        assert rec["cause"] == "bad_payload" and reason in rec["message"], rec
    assert r.get(k.failed_count) == str(len(BAD_ENTRIES))
    assert leftovers(r) == []


# --- long-running mode ---

def worker_clients(r) -> list:
    """The clients of the server (on a cluster: the node that holds the key space) other than ``r``'s own."""
    node = home(r)
    me = node.client_id()
    return [c for c in node.client_list() if int(c["id"]) != me]


@pytest.mark.timeout(60)
def test_idle_worker_wakes_for_new_job(r, cli, spawn):
    w = spawn()
    # Idle means blocked in BLPOP on the wake-up keys: only a push can end that early.
    wait_until(lambda: any("b" in c["flags"] and c["name"] == "worker-wait" for c in worker_clients(r)),
               what="the worker to block idle", proc=w)
    res = cli("enqueue", "push", "--args", '["woke", "yes"]')
    assert res.returncode == 0, res.stderr
    assert r.blpop("woke", timeout=15) == ("woke", "yes"), w.output


def procfile_command(kind: str) -> list:
    for line in (REPO / "Procfile").read_text().splitlines():
        name, sep, command = line.partition(":")
        if sep and name.strip() == kind:
            return shlex.split(command)
    raise AssertionError(f"no {kind!r} process type in the Procfile")


@pytest.mark.timeout(60)
def test_procfile_worker_command_processes_a_job(r, env, broker, spawn):
    argv = procfile_command("worker")
    # `python` as Heroku resolves it: the app's interpreter first on PATH.
    w = spawn(argv=argv, PATH=f"{Path(PYTHON).parent}:{env.get('PATH', '')}")
    broker.push("push", ["procfile", "ran"], {})
    assert r.blpop("procfile", timeout=20) == ("procfile", "ran"), w.output
    w.signal(signal.SIGTERM)
    assert w.wait(15) == 0, w.output


def total_connections(r) -> int:
    return int(home(r).info("stats")["total_connections_received"])


def worker_state(r) -> dict:
    k = keys_of(r)
    (key,) = r.keys(k.worker("*"))
    return r.hgetall(key)


@pytest.mark.single_backend("a node's connection counter also counts the worker's cluster client reconnecting (a "
                             "socket timeout under load, a topology refresh): seen once in a full run; a job child "
                             "runs the same code on both backends")
@pytest.mark.timeout(60)
def test_child_opens_no_redis_connection(r, k, broker, spawn):
    n = 20
    for _ in range(n):
        broker.push("noop", [], {})
    # A job that sleeps without touching Redis keeps a child alive while we look (test jobs connect on their own).
    broker.push("sample_work", [], {"seconds": 60})
    before = total_connections(r)
    w = spawn()
    wait_until(lambda: r.get(k.processed) == str(n)
               and any("sample_work" in v for f, v in worker_state(r).items() if f.startswith("job:")),
               timeout=45, what=f"{n} noop jobs done and sample_work running", proc=w)
    # The worker's own connections only: the command one, plus the one its idle BLPOP waits on.
    clients = worker_clients(r)
    assert "worker" in [c["name"] for c in clients], clients
    assert {c["name"] for c in clients} <= {"worker", "worker-wait"} and len(clients) <= 2, clients
    # Finished children are gone from CLIENT LIST, so it alone could miss their connections; the counter cannot.
    assert total_connections(r) - before == len(clients), w.output


@pytest.mark.timeout(90)
def test_idle_worker_keeps_its_one_connection(r, k, broker, spawn):
    """Going idle after a job must not drop and reopen the worker's connection (a TLS handshake on Heroku)."""
    w = spawn()
    blocked = lambda: any("b" in c["flags"] and c["name"] == "worker-wait" for c in worker_clients(r))  # noqa: E731
    wait_until(blocked, what="the worker to block idle", proc=w)
    before = total_connections(r)
    for i in range(1, 11):
        broker.push("noop", [], {})
        wait_until(lambda: r.get(k.processed) == str(i), what=f"noop job {i}", proc=w)
        wait_until(blocked, what="the worker to block idle again", proc=w)
    assert total_connections(r) - before == 0, w.output


@pytest.mark.timeout(180)
@pytest.mark.single_backend("22 s of CI: a drain on the cluster is test_cluster.py's 2,000 jobs by 4 workers through a "
                            "slot migration")
def test_burst_drains_1000_noops(r, k, broker, spawn):
    broker.push_many("noop", [[] for _ in range(1000)])
    assert r.llen(k.queue("default")) == 1000
    w = spawn("--burst", LOG_LEVEL="WARNING")
    assert w.wait(170) == 0, w.output[-2000:]
    assert r.get(k.processed) == "1000"
    assert r.llen(k.queue("default")) == 0
    assert leftovers(r) == []
    assert r.get(k.failed_count) is None


# --- wrong-typed keys (issue 27 item 1) ---

@pytest.mark.timeout(60)
@pytest.mark.parametrize("attr", ["processed"])
def test_a_wrong_typed_counter_or_index_neither_loses_nor_stalls_a_job(r, k, broker, spawn, attr):
    """Issue 27 item 1: with P:stat:processed of the wrong type, CYCLE raised after the LREM of a done job: its status
    record stayed ``queued`` with no TTL and the log said ``redis.unavailable``. Counters and indexes are bookkeeping:
    the outcome lands, the job's record is done (with its RESULT_TTL), and the log names the key and its type."""
    key = getattr(k, attr)
    r.delete(key)
    r.rpush(key, "junk")
    job_id = broker.push("push", ["out", "x"], {})
    w = spawn(HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="3")
    assert r.blpop("out", timeout=15) == ("out", "x"), w.output
    wait_until(lambda: r.hget(k.job(job_id), "status") == "done", 10, "the done record", w)
    assert r.pttl(k.job(job_id)) > 0
    w.wait_for(rf"event=redis\.wrong_type key={logged(key)} type=list", 10)
    assert "redis.unavailable" not in w.output
    assert leftovers(r) == [] or all(not v for _, v in leftovers(r))
    w.signal(signal.SIGTERM)
    assert w.wait(15) == 0, w.output


@pytest.mark.timeout(60)
@pytest.mark.parametrize("attr", ["paused", "epoch", "workers"])
def test_a_wrong_typed_key_a_claim_reads_is_named_not_taken_for_an_outage(r, k, broker, spawn, attr):
    """Issue 27 item 1: with P:paused or P:epoch wrong-typed a worker claims nothing and repeated the error as
    ``redis.unavailable``; it names the key instead (once per HEARTBEAT_INTERVAL), loses nothing, and claims once
    the key is repaired."""
    key = getattr(k, attr)
    r.delete(key)
    r.rpush(key, "junk")
    broker.push("push", ["out", "x"], {})
    w = spawn(HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="3")
    w.wait_for(rf"event=redis\.wrong_type key={logged(key)} type=list", 15)
    assert "redis.unavailable" not in w.output
    assert r.llen(k.queue("default")) == 1  # claimed nothing, lost nothing
    r.delete(key)
    assert r.blpop("out", timeout=15) == ("out", "x"), w.output
    w.signal(signal.SIGTERM)
    assert w.wait(15) == 0, w.output


# --- outcomes take effect once, whatever the keys around them ---

@pytest.mark.parametrize("op", ["ack", "fail", "retry", "requeue"])
def test_an_outcome_recorded_twice_takes_effect_once(r, k, op):
    """The supervisor re-sends its pending outcomes when a CYCLE call's reply is lost (the call may have run).
    "Only if the job is still ours" (LREM == 1) is what keeps at-least-once from becoming at-least-twice: the
    second copy must count nothing, push nothing, schedule nothing and record no second failure.

    Origin: issue 15, blind spot 2."""
    from worker.fetch import Outcome
    b = make_broker(r)
    payload = job_json("j1", attempts=0)
    r.rpush(k.queue("default"), payload, job_json("behind"))
    (claim,) = b.cycle("w:1", claim=[0]).claims
    assert claim.payload == payload
    retried = job_json("j1", attempts=1)
    outcome = {"ack": Outcome.ack(payload, 0),
               "fail": Outcome.fail(payload, "j1", {"id": "j1", "cause": "error", "payload": payload}, 0),
               "retry": Outcome.retry(payload, retried, 0.0, 0),  # due at once: moved to its queue by the call
               "requeue": Outcome.requeue(payload, "default", 0)}[op]
    first = b.cycle("w:1", [outcome])
    second = b.cycle("w:1", [outcome])  # the same call again, as after a lost reply
    assert first.held == second.held == 0 and r.llen(k.processing("w:1")) == 0
    assert int(r.get(k.processed) or 0) == (op == "ack")
    assert int(r.get(k.failed_count) or 0) == (op == "fail")
    assert r.zcard(k.failed) == r.hlen(k.failed_data) == (op == "fail")
    assert r.zcard(k.scheduled) == 0
    behind = job_json("behind")  # a requeue goes back to the head, a due retry to the tail: each exactly once
    expected = {"requeue": [payload, behind], "retry": [behind, retried]}.get(op, [behind])
    assert r.lrange(k.queue("default"), 0, -1) == expected


@pytest.mark.parametrize("bad", ["workers", "worker_hash"])
def test_an_outcome_beside_a_wrong_typed_bookkeeping_key_loses_no_job(r, k, bad):
    """Chaos review of the lean CYCLE: its first write is now the outcome's LREM, so nothing after it may raise on
    a key of the wrong type. A ``P:workers`` that is not a zset (the beat's ZADD) or a worker hash that is not a hash
    (a checkpoint's HSET) made the call fail after the job had left the processing list: it was in no list at all.
    Whatever else the call does with such keys, the job is either still claimed or back in its queue.

    Origin: chaos review of the lean CYCLE (4ed505f)."""
    from worker.fetch import Outcome
    b = make_broker(r)
    job_id = b.push("push", ["out", "x"], {})
    (claim,) = b.cycle("w:1", [], [0], 0, "").claims
    key = k.workers if bad == "workers" else k.worker("w:1")
    r.delete(key)
    r.set(key, "corrupt")
    try:
        b.cycle("w:1", [Outcome.requeue(claim.payload, "default", 0)], (), 0, "stopping",
                checkpoints=[(0, '{"step":1}')], beat=True)
    except redis.ResponseError:
        pass  # a call may still fail on such a key, after its outcome took effect
    held = r.lrange(k.processing("w:1"), 0, -1) + r.lrange(k.queue("default"), 0, -1)
    assert [jobs.loose_id(p) for p in held] == [job_id]



# --- bad payloads are failed with a reason, never fatal ---

@pytest.mark.timeout(60)
def test_nan_and_deeply_nested_payloads_are_failed_not_fatal(r, k, spawn):
    """Origin: runtime review (9f32e73, hardening)."""
    r.rpush(k.queue("default"),
            '{"id":"n1","name":"push","queue":"default","args":["out",NaN],"kwargs":{}}',
            '{"id":"d1","name":"push","args":' + "[" * 5000 + "]" * 5000 + ',"kwargs":{}}',
            json.dumps({"id": "ok", "name": "push", "args": ["out", "after"], "kwargs": {}}))
    w = spawn("--burst", JOB_RETRIES="2")
    assert w.wait(30) == 0, w.output
    assert r.lrange("out", 0, -1) == ["after"]
    assert r.zcard(k.failed) == 2
    for rec in r.hvals(k.failed_data):
        assert json.loads(rec)["cause"] == "bad_payload"


@pytest.mark.timeout(30)
def test_oversized_bad_payload_is_failed_with_a_bounded_copy(r, k, spawn, enqueue):
    """Origin: core review (9a4b9fe), #8."""
    r.rpush(k.queue("default"), "j" * 200_000)
    r.sadd(k.queues, "default")
    w = spawn(JOB_MODULES=MODULES, MAX_PAYLOAD_BYTES=1024)
    wait_until(lambda: r.hlen(k.failed_data) == 1, 15, "the failure record")
    (rec,) = [json.loads(v) for v in r.hvals(k.failed_data)]
    reason = " ".join(str(rec.get(k) or "") for k in ("cause", "type", "message"))
    assert "MAX_PAYLOAD_BYTES" in reason or "over" in reason, rec.keys()
    assert isinstance(rec.get("payload"), str) and len(rec["payload"]) <= 70_000, len(rec.get("payload") or "")
    assert r.llen(k.queue("default")) == 0
    wait_until(lambda: processing(r) == {}, 10, "the processing list emptied")
    still_works(r, w, enqueue, "oversized")
