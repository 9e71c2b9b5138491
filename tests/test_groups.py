"""Groups with an exactly-once completion callback (issue 25 item 4): ``group([f.call(...), ...],
on_complete=g.call(...)).enqueue()``. A member's end (done, failed for good, canceled, written off by recovery) is
counted in the same script call that records it, once (HSETNX of its id into the group's results); the call that
records the last member queues the callback, which gets ``results=`` in member order (worker/jobgroups.py)."""
import json
import signal
import time

import pytest

from tests.support import wait_until
from worker import cancel, get_group, group, jobs, testing
from worker.keys import Keys
from worker.results import get_job

MODULES = "worker.sample,tests.jobs,tests.jobs_groups"
K = Keys()
FAST = {"HEARTBEAT_INTERVAL": "0.5", "HEARTBEAT_TTL": "2", "JOB_MODULES": MODULES}


@pytest.fixture
def gj(r, module_broker):
    import tests.jobs_groups as gj
    module_broker(MODULES)
    return gj


def reports(r, key) -> list:
    return [json.loads(x) for x in r.lrange(key + ":report", 0, -1)]


def wait_report(r, key, n=1, timeout=30.0) -> list:
    wait_until(lambda: r.llen(key + ":report") >= n, timeout, f"{n} callback run(s) of {key}")
    return reports(r, key)


def settled(r, gid, timeout=20.0) -> dict:
    """get_group once its callback has ended (done or failed)."""
    wait_until(lambda: (get_group(gid) or {}).get("callback", {}).get("status") in ("done", "failed"), timeout,
               f"group {gid}'s callback ended")
    return get_group(gid)


@pytest.mark.timeout(60)
def test_the_callback_runs_once_with_the_results_in_member_order(r, gj, spawn):
    gid = group([gj.g_send.call("h", n) for n in range(5)], on_complete=gj.g_report.call("h", label="L")).enqueue()
    g = get_group(gid)
    assert (g["total"], g["pending"], g["done"], g["callback"]["status"]) == (5, 5, 0, "waiting")
    member_ids = r.lrange(K.group_ids(gid), 0, -1)
    assert [get_job(i).status for i in member_ids] == ["queued"] * 5
    w = spawn(JOB_MODULES=MODULES, WORKER_CONCURRENCY="3")
    (rep,) = wait_report(r, "h")
    assert rep["label"] == "L"
    assert [x["id"] for x in rep["results"]] == member_ids
    assert [(x["status"], x["result"], x["error"]) for x in rep["results"]] == [("done", n * 10, None)
                                                                               for n in range(5)]
    g = settled(r, gid)
    assert (g["total"], g["done"], g["failed"], g["canceled"], g["pending"]) == (5, 5, 0, 0, 0)
    assert g["callback"]["status"] == "done" and get_job(g["callback"]["id"]).result == 5
    assert g["completed_at"] >= g["created_at"] > 0
    # the group's keys now expire with the callback's status record (RESULT_TTL of g_report: 600 s)
    for key in (K.group(gid), K.group_ids(gid), K.group_res(gid)):
        assert 0 < r.pttl(key) <= 600_000, key
    w.signal(signal.SIGTERM)
    assert w.wait(15) == 0
    assert len(reports(r, "h")) == 1


@pytest.mark.timeout(90)
def test_members_failing_for_good_retried_and_canceled_end_the_group_once(r, gj, spawn, module_broker):
    """Failed after its retry, failed at once (dont_retry), done on its retry, canceled while queued: each is one
    end; the callback runs once, after the last, with each member's status, result and error."""
    members = [gj.g_send.call("f", 1), gj.g_fail.call("f", 2), gj.g_flaky.call("f", 3), gj.g_dont.call("f", 4),
               gj.g_send.options(queue="parked").call("f", 5)]
    gid = group(members, on_complete=gj.g_report.call("f")).enqueue()
    ids = r.lrange(K.group_ids(gid), 0, -1)
    w = spawn(JOB_MODULES=MODULES, WORKER_CONCURRENCY="2")
    wait_until(lambda: get_group(gid)["pending"] == 1, 40, "every member but the parked one ended")
    assert r.llen("f:report") == 0 and get_group(gid)["callback"]["status"] == "waiting"
    assert cancel(ids[4]) is True  # queued on a queue no worker serves: canceled there (cancel.lua)
    (rep,) = wait_report(r, "f")
    got = [(x["status"], x["result"], (x["error"] or {}).get("type")) for x in rep["results"]]
    assert got == [("done", 10, None), ("failed", None, "ValueError"), ("done", 2, None),
                   ("failed", None, "KeyError"), ("canceled", None, None)]
    assert "member 2 fails" in rep["results"][1]["error"]["message"]
    assert r.lrange("f:runs", 0, -1).count("fail2") == 2 and r.lrange("f:runs", 0, -1).count("dont4") == 1
    g = settled(r, gid)
    assert (g["done"], g["failed"], g["canceled"], g["pending"]) == (2, 2, 1, 0)
    assert cancel(ids[4]) is False  # once
    w.signal(signal.SIGTERM)
    assert w.wait(15) == 0
    assert len(reports(r, "f")) == 1


@pytest.mark.timeout(90)
def test_a_member_run_again_from_the_failed_registry_is_not_counted_twice(r, gj, spawn, module_broker):
    """The HSETNX guard: a member that failed for good and is retried from the failed registry (`failed retry`)
    ends a second time while another member is still running. Counted again, it would complete the group early."""
    from worker.failed import FailedRegistry
    gid = group([gj.g_dont.call("d", 1), gj.g_gate.call("d", 2)], on_complete=gj.g_report.call("d")).enqueue()
    ids = r.lrange(K.group_ids(gid), 0, -1)
    w = spawn(JOB_MODULES=MODULES, WORKER_CONCURRENCY="2")
    assert r.blpop(["d:started"], 20)
    wait_until(lambda: get_group(gid)["failed"] == 1, 20, "the first member failed")
    assert FailedRegistry(jobs.default_broker()).retry([ids[0]]) == [ids[0]]
    wait_until(lambda: r.lrange("d:runs", 0, -1).count("dont1") == 2 and get_job(ids[0]).status == "failed", 20,
               "the member's second run failed")
    g = get_group(gid)
    assert (g["failed"], g["pending"], g["callback"]["status"]) == (1, 1, "waiting") and r.llen("d:report") == 0
    r.rpush("d:go", "x")
    (rep,) = wait_report(r, "d")
    assert [x["status"] for x in rep["results"]] == ["failed", "done"]
    settled(r, gid)
    w.signal(signal.SIGTERM)
    assert w.wait(15) == 0
    assert len(reports(r, "d")) == 1


@pytest.mark.timeout(60)
def test_a_lost_reply_re_sent_records_the_last_member_and_queues_the_callback_once(r, gj, module_broker):
    """redis-py re-sends a script call whose reply it lost (a timeout): the CYCLE call that records the last member
    runs twice, and the group's enqueue too; the callback is queued once, each member counted once."""
    from worker.fetch import Outcome
    from worker.lua import calls as wire
    b = jobs.default_broker()
    gid = group([gj.g_send.call("l", 1), gj.g_send.call("l", 2)], on_complete=gj.g_report.call("l")).enqueue()
    assert r.hget(K.group(gid), "c1") == "1"
    b.register("w:1", {})
    claims = b.cycle("w:1", claim=[0, 1]).claims
    assert len(claims) == 2
    for c in claims:
        job_id = json.loads(c.payload)["id"]
        call = wire.cycle(b.keys, "w:1", beat_ttl_ms="", failed_max=100, failed_ttl_ms=60000, wildcard=False,
                          mode="", busy=0, tidy=False, epoch=b.epoch, queues=["default"], checkpoints=[],
                          outcomes=[Outcome.ack(c.payload, c.slot, job_id, "7").wire(b.cfg)], claim=[])
        b.run(call)
        b.run(call)  # the same call again, as redis-py re-sends it
    g = get_group(gid)
    assert (g["done"], g["pending"], g["callback"]["status"]) == (2, 0, "queued")
    assert r.llen(K.queue("default")) == 1 and json.loads(r.lindex(K.queue("default"), 0))["name"] == "g_report"
    assert r.hlen(K.group_res(gid)) == 2
    # the enqueue's chunk re-sent: nothing written twice
    assert b.run(wire.group(b.keys, gid, 1, 2, ("{}", "x", "g_report", "default"), [("z", "g_send", "default", "{}")])) == 0
    assert r.llen(K.group_ids(gid)) == 2 and r.llen(K.queue("default")) == 1


def _kill_mid_group(r, gj, spawn, key, **env):
    """Worker A (3 slots) runs three gated members; it is SIGKILLed (whole tree) and worker B recovers them."""
    gid = group([gj.g_gate.call(key, n) for n in range(3)], on_complete=gj.g_report.call(key)).enqueue()
    a = spawn(DYNO="worker.1", WORKER_CONCURRENCY="3", **FAST, **env)
    wait_until(lambda: r.llen(key + ":started") == 3, 20, "three members running on A")
    b = spawn(DYNO="worker.2", WORKER_CONCURRENCY="3", **FAST, **env)
    b.wait_for(r"event=worker.start")
    a.kill_tree()
    return gid, b


@pytest.mark.timeout(90)
def test_a_sigkilled_dyno_mid_group_fires_the_callback_once(r, gj, spawn):
    gid, b = _kill_mid_group(r, gj, spawn, "k")
    b.wait_for(r"event=recovery\.requeued", 20)
    wait_until(lambda: r.llen("k:started") == 6, 20, "the three members running again on B")
    assert get_group(gid)["pending"] == 3 and r.llen("k:report") == 0
    r.rpush("k:go", "1", "2", "3")
    (rep,) = wait_report(r, "k")
    assert [x["status"] for x in rep["results"]] == ["done"] * 3 and sorted(x["result"] for x in rep["results"]) \
        == [0, 1, 2]
    settled(r, gid)
    b.signal(signal.SIGTERM)
    assert b.wait(15) == 0
    assert len(reports(r, "k")) == 1


@pytest.mark.timeout(90)
def test_members_written_off_by_recovery_count_as_failed(r, gj, spawn):
    """MAX_ATTEMPTS=1: recovery writes the killed members off (failed registry, cause lost) in the same call that
    records them in their group; the last one queues the callback."""
    gid, b = _kill_mid_group(r, gj, spawn, "m", MAX_ATTEMPTS="1")
    (rep,) = wait_report(r, "m")
    assert [(x["status"], x["error"]["type"]) for x in rep["results"]] == [("failed", "WorkerLost")] * 3
    g = settled(r, gid)
    assert (g["failed"], g["pending"]) == (3, 0)
    b.signal(signal.SIGTERM)
    assert b.wait(15) == 0
    assert len(reports(r, "m")) == 1


def commands(r) -> dict:
    return {k[len("cmdstat_"):]: v["calls"] for k, v in r.info("commandstats").items()}


@pytest.mark.timeout(300)
def test_ten_thousand_members_enqueue_in_ten_calls_and_complete(r, gj, spawn, monkeypatch):
    import redis.connection
    calls = [gj.g_short.call("big", n, 0) for n in range(10_000)]
    sends = []
    real = redis.connection.AbstractConnection.send_packed_command

    def counted(self, command, check_health=True):
        sends.append(1)
        return real(self, command, check_health)
    jobs.default_broker().r.ping()
    r.config_resetstat()
    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
    gid = group(calls, on_complete=gj.g_count.call("big")).enqueue()
    monkeypatch.undo()
    got = commands(r)
    print(f"\n10,000 members enqueued: {len(sends)} round trips, top-level script calls "
          f"{got.get('evalsha', 0) + got.get('eval', 0)}")
    assert got.get("evalsha", 0) + got.get("eval", 0) == 10  # one GROUP call per 1,000 members
    assert len(sends) <= 10  # all in one MULTI pipeline, + redis-py's SCRIPT EXISTS (and LOAD, the first time)
    assert r.llen(K.queue("default")) == 10_000 and get_group(gid)["total"] == 10_000
    # The members are claimed and recorded by the worker's own CYCLE script, 500 per call, in this process: 10,000
    # forked runs take minutes on a loaded 2-core CI machine, and the group's accounting is all in that script.
    from worker.fetch import Outcome
    b, started, held, calls_made, left = jobs.default_broker(), time.monotonic(), [], 0, 10_000
    b.register("drain:1", {})
    while held or left:
        acks = [Outcome.ack(c.payload, c.slot, json.loads(c.payload)["id"], str(c.slot)) for c in held]
        held = b.cycle("drain:1", outcomes=acks, claim=list(range(min(500, left)))).claims  # members only
        left -= len(held)
        calls_made += 1
    assert get_group(gid)["pending"] == 0 and r.llen(K.queue("default")) == 1  # the callback, queued once
    print(f"10,000 members recorded in {calls_made} CYCLE calls, {time.monotonic() - started:.1f}s")
    w = spawn(JOB_MODULES=MODULES, LOG_LEVEL="WARNING")
    (rep,) = wait_report(r, "big", timeout=60)
    assert rep["n"] == 10_000 and rep["done"] == 10_000
    assert rep["ids"] == r.lrange(K.group_ids(gid), 0, 2)
    assert settled(r, gid, 30)["done"] == 10_000 and len(reports(r, "big")) == 1
    w.signal(signal.SIGTERM)
    assert w.wait(15) == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_chaos_whole_dynos_killed_and_stopped_nothing_lost_callback_once(r, gj, spawn):
    """Three dynos run 16 groups of 12 short members while a seeded random schedule SIGKILLs whole trees (a dyno
    crash) and SIGTERMs whole process groups (a Heroku stop), restarting each at once. Every member completes,
    every group ends with all members done, and each callback is queued once (``CHAOS_SEED`` replays a schedule)."""
    import os
    import random
    seed = int(os.environ.get("CHAOS_SEED") or 25004)
    rng = random.Random(seed)
    env = dict(FAST, WORKER_CONCURRENCY="2", SHUTDOWN_WINDOW="4", LOG_LEVEL="INFO")
    gids, expected = [], set()
    for g in range(16):
        ms = [gj.g_short.call("ch", f"{g}.{n}", rng.choice([0.01, 0.05, 0.1, 0.3])) for n in range(12)]
        expected |= {f"{g}.{n}" for n in range(12)}
        gids.append(group(ms, on_complete=gj.g_chaos_report.call("ch", f"g{g}")).enqueue())
    dynos = [spawn(DYNO=f"worker.{i + 1}", **env) for i in range(3)]
    kills = terms = 0
    started = time.monotonic()
    while time.monotonic() - started < 15 and r.scard("ch:done") < len(expected):
        time.sleep(rng.uniform(0.3, 1.0))  # the chaos schedule itself, not a synchronisation
        i = rng.randrange(3)
        if rng.random() < 0.5:
            dynos[i].kill_tree()
            kills += 1
        else:
            try:
                os.killpg(dynos[i].pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            terms += 1
        dynos[i] = spawn(DYNO=f"worker.{i + 1}", **env)
    wait_until(lambda: all((get_group(g) or {}).get("callback", {}).get("status") == "done" for g in gids), 180,
               f"every group's callback done (seed {seed})")
    print(f"\ngroups chaos: seed={seed}, {kills} SIGKILLs, {terms} SIGTERMs, {time.monotonic() - started:.1f}s")
    assert r.smembers("ch:done") == expected, f"seed {seed}: members lost"
    reruns = 0
    for n, gid in enumerate(gids):
        g = get_group(gid)
        assert (g["done"], g["pending"]) == (12, 0), (seed, g)
        runs = [json.loads(x) for x in r.lrange(f"ch:report:g{n}", 0, -1)]
        assert runs and all(x["n"] == x["done"] == 12 for x in runs), (seed, gid, runs)
        # queued once: a second run can only be the one callback run again after its dyno was SIGKILLed mid-run
        # (at-least-once, as every job; recovery counts the lost attempt), never a second copy (same attempt)
        attempts = [x["attempt"] for x in runs]
        assert len(set(attempts)) == len(attempts), (seed, gid, runs)
        reruns += len(runs) - 1
    print(f"groups chaos: {reruns} callback(s) run again after a SIGKILL mid-run")


def test_inline_mode_runs_the_members_then_the_callback(r, redis_server, monkeypatch):
    import tests.jobs_groups as gj
    monkeypatch.setenv("EVENTS_REDIS_URL", redis_server.url)  # where the test jobs record their runs
    with testing.inline() as run:
        gid = group([gj.g_send.call("i", 1), gj.g_dont.call("i", 2)], on_complete=gj.g_report.call("i", "x")).enqueue()
        g = get_group(gid)
    assert (g["total"], g["done"], g["failed"], g["pending"], g["callback"]["status"]) == (2, 1, 1, 0, "done")
    (rep,) = reports(r, "i")
    assert [(x["status"], x["result"], (x["error"] or {}).get("type")) for x in rep["results"]] == \
        [("done", 10, None), ("failed", None, "KeyError")]
    assert [j["name"] for j in run.jobs] == ["g_send", "g_dont", "g_report"]


def test_calls_and_groups_are_checked_when_made(gj):
    with pytest.raises(TypeError, match="arguments do not fit"):
        gj.g_send.call("x")
    with pytest.raises(TypeError, match="must accept results="):
        group([gj.g_send.call("x", 1)], on_complete=gj.g_send.call("x", 2))
    with pytest.raises(TypeError, match="must not pass results="):
        group([], on_complete=gj.g_report.call("x", results=[]))
    with pytest.raises(TypeError, match="f.call"):
        group([("g_send", 1)], on_complete=gj.g_report.call("x"))
    with pytest.raises(TypeError, match="delay= or job_id="):
        gj.g_send.options(job_id="mine").call("x", 1)


@pytest.mark.timeout(60)
def test_an_empty_group_queues_its_callback_at_once(r, gj, spawn):
    gid = group([], on_complete=gj.g_report.call("e")).enqueue()
    assert get_group(gid)["callback"]["status"] == "queued"
    spawn(JOB_MODULES=MODULES)
    (rep,) = wait_report(r, "e")
    assert rep["results"] == []


def test_a_wrong_typed_queue_refuses_the_whole_group(r, gj):
    """Checked before the first write: a member's queue of the wrong type (even in a later chunk's share of the
    transaction) makes the enqueue raise with nothing written."""
    import redis
    r.set(K.queue("parked"), "x")
    members = [gj.g_send.call("w", n) for n in range(1500)] + [gj.g_send.options(queue="parked").call("w", 0)]
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        group(members, on_complete=gj.g_report.call("w")).enqueue()
    assert r.llen(K.queue("default")) == 0 and not r.keys(K.group("*")) and not r.keys(K.job("*"))


@pytest.mark.timeout(60)
def test_a_wrong_typed_group_key_never_aborts_the_outcome(r, gj, spawn):
    """The member's outcome is recorded whatever the group's keys hold (pcall: no abort after the first write);
    the key is named in the worker's log."""
    gid = group([gj.g_send.call("t", 1), gj.g_send.call("t", 2)], on_complete=gj.g_report.call("t")).enqueue()
    r.set(K.group_res(gid), "junk")
    ids = r.lrange(K.group_ids(gid), 0, -1)
    w = spawn(JOB_MODULES=MODULES)
    wait_until(lambda: all(get_job(i).status == "done" for i in ids), 20, "both members done")
    w.wait_for(rf"group_res:{gid}")
    assert get_group(gid)["pending"] == 2 and r.llen("t:report") == 0
    w.signal(signal.SIGTERM)
    assert w.wait(15) == 0


def test_the_cli_shows_a_groups_progress(r, gj, env):
    from tests.conftest import run_cli
    gid = group([gj.g_send.call("c", 1)], on_complete=gj.g_report.call("c")).enqueue()
    out = run_cli(env, "group", gid)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert (got["total"], got["pending"], got["callback"]["status"]) == (1, 1, "waiting")
    assert run_cli(env, "group", "nope").returncode == 1


@pytest.mark.timeout(120)
def test_a_group_on_a_cluster_keeps_its_keys_in_the_prefix_slot(r, env, redis_cluster, redis_server, spawn):
    """Issue 26 with groups: the group's keys derive from the prefix (one hash tag); enqueue's MULTI goes to the
    slot's node; the callback reads results= through the cluster client."""
    import redis as redis_py

    import tests.jobs_groups as gj
    import worker.config
    from worker.client import connect
    from worker.fetch import Broker
    redis_cluster.flush()
    cenv = dict(env, REDIS_URL=redis_cluster.url, REDIS_CLUSTER="1", EVENTS_REDIS_URL=redis_server.url,
                JOB_MODULES=MODULES)
    cfg = worker.config.from_mapping(cenv)
    b = Broker(connect(cfg, name="test"), cfg)
    jobs.use(b)
    try:
        gid = group([gj.g_send.call("cl", n) for n in range(3)], on_complete=gj.g_report.call("cl")).enqueue()
        spawn(**cenv)
        (rep,) = wait_report(r, "cl")
        assert [x["result"] for x in rep["results"]] == [0, 10, 20]
        cr = redis_py.RedisCluster.from_url(redis_cluster.url, decode_responses=True)
        keys = [k for k in cr.keys(target_nodes=redis_py.RedisCluster.ALL_NODES) if "group" in k]
        cr.close()
        assert sorted(keys) == sorted([f"{{worker}}:group:{gid}", f"{{worker}}:group_ids:{gid}",
                                       f"{{worker}}:group_res:{gid}"])
        wait_until(lambda: get_group(gid)["callback"]["status"] == "done", 20, "the callback done")
    finally:
        jobs.use(None)
        b.r.close()


@pytest.mark.timeout(60)
def test_a_member_canceled_while_running_ends_canceled_and_a_canceled_callback_frees_the_group(r, gj, spawn):
    gid = group([gj.g_gate.call("cr", 1), gj.g_send.call("cr", 2)],
                on_complete=gj.g_report.options(queue="parked").call("cr")).enqueue()
    ids = r.lrange(K.group_ids(gid), 0, -1)
    w = spawn(JOB_MODULES=MODULES, HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="3", WORKER_CONCURRENCY="2")
    assert r.blpop(["cr:started"], 20)
    assert cancel(ids[0], running=True) is True
    wait_until(lambda: get_group(gid)["callback"]["status"] == "queued", 20, "the callback queued")
    g = get_group(gid)
    assert (g["done"], g["canceled"], g["pending"]) == (1, 1, 0)
    assert r.hget(K.group_res(gid), ids[0]) == "canceled\n"
    assert cancel(g["callback"]["id"]) is True  # queued on a queue no worker serves
    assert get_group(gid)["callback"]["status"] == "canceled"
    keep = r.pttl(K.job(g["callback"]["id"]))
    for key in (K.group(gid), K.group_ids(gid), K.group_res(gid)):
        assert 0 < r.pttl(key) <= keep + 100 and r.pttl(key) > keep - 5000, key  # with the callback's record
    w.signal(signal.SIGTERM)
    assert w.wait(15) == 0
