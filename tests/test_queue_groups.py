"""Queue groups (issue 26 point 2, ``QUEUE_GROUPS``, worker/groups.py): each group its own key space (its own hash tag
on a cluster); a worker serves one group; producers route each enqueue to its queue's group; status, job lookups,
the failed registry, pause/resume, queue depth and the dashboard see every group.

Most tests run on the session's single redis-server (groups are then separate prefixes); the last runs 3 groups on
the 3 primaries of the local cluster (tests/support.py LocalCluster).
"""
from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
import redis

import worker.config
from tests.conftest import run_cli
from tests.support import wait_until
from worker.client import connect
from worker.config import ConfigError
from worker.fetch import Broker

GROUPS = "fast=default,mail;slow=reports,exports"


def genv(env, **extra):
    return dict(env, QUEUE_GROUPS=GROUPS, HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="2", **extra)


def broker_for(env) -> Broker:
    cfg = worker.config.from_mapping(env)
    return Broker(connect(cfg, name="test"), cfg)


def test_queue_groups_config_gives_each_group_a_key_space_and_the_worker_one_group():
    """QUEUE_GROUPS's syntax; QUEUES=@group, queues of one group, or (unset) the first group; ungrouped, the keys are
    exactly what they were (``worker``, ``{worker}`` on a cluster)."""
    f = worker.config.from_mapping
    cfg = f({"QUEUE_GROUPS": " fast = default , mail ; slow=reports,exports;", "QUEUES": "@slow"})
    assert cfg.queue_groups == (("fast", ("default", "mail")), ("slow", ("reports", "exports")))
    assert (cfg.group, cfg.queues, cfg.key_prefix) == ("slow", ("reports", "exports"), "worker:slow")
    assert [s.key_prefix for s in cfg.spaces()] == ["worker:fast", "worker:slow"]
    assert f({"QUEUE_GROUPS": GROUPS, "QUEUES": "mail"}).key_prefix == "worker:fast"
    assert f({"QUEUE_GROUPS": GROUPS}).queues == ("default", "mail")
    clu = f({"QUEUE_GROUPS": GROUPS, "REDIS_CLUSTER": "1", "KEY_PREFIX": "app", "QUEUES": "exports"})
    assert clu.key_prefix == "{app:slow}" and clu.group_prefix("fast") == "{app:fast}"
    assert f({}).key_prefix == "worker" and f({}).spaces()[0].key_prefix == "worker"
    assert f({"REDIS_CLUSTER": "1"}).key_prefix == "{worker}"
    with pytest.raises(ValueError, match="in no group"):
        cfg.group_of("nowhere")
    bad = [({"QUEUE_GROUPS": "fast"}, "QUEUE_GROUPS=.*group=queue"),
           ({"QUEUE_GROUPS": "a=x;a=y"}, "QUEUE_GROUPS=.*named twice"),
           ({"QUEUE_GROUPS": "a=x;b=x"}, "QUEUE_GROUPS=.*'x' is in groups 'a' and 'b'"),
           ({"QUEUE_GROUPS": "a=x,"}, "QUEUE_GROUPS=.*not a queue name"),
           ({"QUEUE_GROUPS": "a:b=x"}, "QUEUE_GROUPS="),
           ({"QUEUE_GROUPS": "processing=x"}, "QUEUE_GROUPS=.*word of the key schema"),
           ({"QUEUE_GROUPS": GROUPS, "QUEUES": "mail,reports"}, "QUEUES=.*groups fast, slow"),
           ({"QUEUE_GROUPS": GROUPS, "QUEUES": "other"}, "QUEUES=.*'other' is in no group"),
           ({"QUEUE_GROUPS": GROUPS, "QUEUES": "*"}, "QUEUES='\\*'.*QUEUES=@fast"),
           ({"QUEUE_GROUPS": GROUPS, "QUEUES": "@medium"}, "QUEUES=.*no group 'medium'"),
           ({"QUEUES": "@fast"}, "QUEUES=.*needs QUEUE_GROUPS")]
    for env, pattern in bad:
        with pytest.raises(ConfigError, match=pattern):
            f(env)


def test_a_bad_queue_groups_value_exits_2_with_one_line_before_connecting(env):
    """The CLI's config rule: one line naming the variable, exit 2, no connection attempted (the URL is unreachable,
    so a connection attempt would show as a retry or another message)."""
    res = run_cli(env, "status", QUEUE_GROUPS="a=x;b=x", REDIS_URL="redis://127.0.0.1:1/0")
    assert res.returncode == 2, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "QUEUE_GROUPS=" in lines[0], res.stderr


def test_producers_route_each_enqueue_to_its_queues_group(env, r):
    """push, enqueue_in/at, push_many over several queues: each job's keys are in its queue's group; a queue in no
    group is refused with ValueError and nothing is written."""
    b = broker_for(genv(env))
    a = b.push("push", ["out", 1], {}, queue="mail")
    c = b.push("push", ["out", 2], {}, queue="reports", delay=3600)
    d = b.push("push", ["out", 3], {}, queue="exports", due=2e9)
    ids = b.push_many("push", [["out", i] for i in range(10)], queue="reports")
    assert r.llen("worker:fast:queue:mail") == 1 and r.hget(f"worker:fast:job:{a}", "queue") == "mail"
    assert r.zcard("worker:slow:scheduled") == 2 and r.exists(f"worker:slow:job:{c}", f"worker:slow:job:{d}") == 2
    assert r.llen("worker:slow:queue:reports") == 10 and r.smembers("worker:slow:queues") == {"reports"}
    assert r.smembers("worker:fast:queues") == {"mail"}
    before = sorted(r.keys("*"))
    with pytest.raises(ValueError, match="'nowhere' is in no group"):
        b.push("push", ["out", 0], {}, queue="nowhere")
    with pytest.raises(ValueError, match="in no group"):
        b.push_many("push", [["out", 0]], queue="nowhere")
    assert sorted(r.keys("*")) == before
    assert not [k for k in before if k.startswith("worker:queue") or k == "worker:queues"], before
    assert b.find(ids[0]).keys.prefix == "worker:slow" and b.find(a).keys.prefix == "worker:fast"
    b.r.close()


def test_the_async_producer_routes_by_group_and_finds_the_job(env, r, monkeypatch, redis_server):
    """enqueue_async / get_job_async (worker/aio_broker.py) on redis-py's asyncio client, grouped."""
    import worker as api
    from worker import aio_broker
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    monkeypatch.setenv("QUEUE_GROUPS", GROUPS)

    async def go():
        job_id = await api.enqueue_async("push", "out", 1, queue="exports")
        job = await api.get_job_async(job_id)
        await aio_broker.close()
        return job_id, job
    job_id, job = asyncio.run(go())
    assert r.llen("worker:slow:queue:exports") == 1 and (job.status, job.queue) == ("queued", "exports")


def test_a_worker_per_group_drains_its_group_and_the_read_model_sees_every_group(env, r, spawn, module_broker):
    """Two workers (QUEUES=@fast, QUEUES=reports): each claims only its group's jobs, in its key space; then status
    (--json and the table), `job`, get_job/wait, the failed registry CLI (list, show, retry --all), pause/resume and
    queue_depth read and act over both groups."""
    e = genv(env)
    b = broker_for(e)
    fast = [b.push("push", ["out", i], {}, queue="mail") for i in range(5)]
    slow = [b.push("push", ["out", 100 + i], {}, queue="reports") for i in range(5)]
    bad = [b.push("fail", ["boom-fast"], {}, queue="default"), b.push("fail", ["boom-slow"], {}, queue="reports")]
    wf = spawn("--burst", **dict(e, QUEUES="@fast"))
    assert wf.wait(60) == 0, wf.output
    assert sorted(int(x) for x in r.lrange("out", 0, -1)) == list(range(5)), "the fast worker ran only fast jobs"
    assert r.llen("worker:slow:queue:reports") == 6
    ws = spawn("--burst", **dict(e, QUEUES="reports"))
    assert ws.wait(60) == 0, ws.output
    assert sorted(int(x) for x in r.lrange("out", 0, -1)) == [*range(5), *range(100, 105)]
    # start-up: another group's queue is not "unserved" (its workers serve it); a queue in no group is
    assert not re.search(r"queues_not_served.*queue=default\b", ws.output), ws.output
    assert re.search(r"queues_not_served.*queue=high\b.*in no group", wf.output), wf.output
    assert int(r.get("worker:fast:stat:processed")) == 5 and int(r.get("worker:slow:stat:processed")) == 5

    doc = json.loads(run_cli(e, "status", "--json").stdout)
    assert doc["totals"] == {"processed": 10, "failed": 2} and doc["failed"] == 2, doc
    assert {(q["name"], q["group"]) for q in doc["queues"]} >= {("mail", "fast"), ("reports", "slow")}
    assert [g["name"] for g in doc["groups"]] == ["fast", "slow"]
    table = run_cli(e, "status").stdout
    assert "GROUP" in table and "reports" in table
    job = json.loads(run_cli(e, "job", slow[0], "--json").stdout)
    assert (job["status"], job["group"], job["queue"]) == ("done", "slow", "reports")

    import worker as api
    from worker import jobs
    broker = module_broker("tests.jobs")
    grouped = Broker(broker.r, worker.config.from_mapping({"REDIS_URL": e["REDIS_URL"], "QUEUE_GROUPS": GROUPS}))
    jobs.use(grouped)
    assert api.get_job(fast[0]).status == "done" and api.get_job(slow[1]).queue == "reports"
    assert api.get_job(slow[2]).wait(timeout=5).status == "done"
    assert api.queue_depth(["mail", "reports"]) == {"mail": 0, "reports": 0}
    pending = grouped.push("push", ["out", 999], {}, queue="exports")
    assert api.cancel(pending) and api.get_job(pending).status == "canceled"
    assert api.get_job("nope") is None

    listed = run_cli(e, "failed", "--json")
    recs = json.loads(listed.stdout)
    assert recs["count"] == 2 and {j["id"] for j in recs["jobs"]} == set(bad), recs
    assert "boom-slow" in run_cli(e, "failed", "show", bad[1]).stdout
    assert run_cli(e, "failed", "retry", "--all").stdout.startswith("retried 2 job(s)")
    assert r.llen("worker:fast:queue:default") == 1 and r.llen("worker:slow:queue:reports") == 1

    assert run_cli(e, "pause", "--queue", "exports").returncode == 0
    assert r.smembers("worker:slow:paused") == {"exports"} and not r.exists("worker:fast:paused")
    assert run_cli(e, "pause").returncode == 0
    assert r.sismember("worker:fast:paused", "*") and r.sismember("worker:slow:paused", "*")
    assert run_cli(e, "resume").returncode == 0
    assert not r.exists("worker:fast:paused", "worker:slow:paused")
    res = run_cli(e, "pause", "--queue", "nowhere")
    assert res.returncode == 2 and "in no group" in res.stderr


def test_periodic_jobs_are_scheduled_by_the_workers_of_their_queues_group(env, r, spawn):
    """A worker schedules only the periodic jobs whose queue is in its group, in its group's key space (so the
    tick claim stays atomic in that slot); `status` lists every group's schedules."""
    e = dict(env, JOB_MODULES="tests.jobs_schedule", QUEUE_GROUPS="a=default,sched;b=strict,hourly,cron",
             HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="2")
    wa = spawn(**dict(e, QUEUES="default"))
    wb = spawn(**dict(e, QUEUES="strict"))
    wa.wait_for("event=worker.ready|event=worker.started|event=schedule.enqueued", timeout=30)
    wait_until(lambda: r.llen("worker:a:queue:sched") >= 1, timeout=30, what="every_second in group a")
    wait_until(lambda: r.exists("worker:b:sched:hourly", "worker:b:sched:minutely") == 2, timeout=30,
               what="group b's schedules")
    assert "schedule=every_second" not in wb.output and "schedule=hourly " not in wa.output
    assert not r.exists("worker:a:sched:hourly", "worker:b:sched:every_second", "worker:queue:sched")
    doc = json.loads(run_cli(e, "status", "--json").stdout)
    assert {(s["name"], s["group"]) for s in doc["schedules"]} >= {("every_second", "a"), ("hourly", "b")}


def test_the_dashboard_shows_and_acts_on_every_group(env, r, redis_server):
    """The dashboard (worker/web) over groups: the overview lists both groups' queues, a job of each is found, the
    failed page merges both registries, pausing a queue pauses it in its group, HireFire gets a backlog per group."""
    from tests.test_dashboard import PASSWORD, Client
    from worker.web import make_app
    cfg = worker.config.from_mapping({"REDIS_URL": redis_server.url, "DASHBOARD_PASSWORD": PASSWORD,
                                      "QUEUE_GROUPS": GROUPS, "HIREFIRE_TOKEN": "h" * 24})
    b = Broker(r, cfg)
    j1, j2 = b.push("push", ["out", 1], {}, queue="mail"), b.push("push", ["out", 2], {}, queue="exports")
    for g, jid in (("fast", "ffail"), ("slow", "sfail")):
        rec = {"id": jid, "name": "fail", "queue": "mail" if g == "fast" else "exports", "payload": "{}",
               "type": "RuntimeError", "message": f"boom {g}", "failed_at": time.time()}
        r.zadd(f"worker:{g}:failed", {jid: int(time.time() * 1000)})
        r.hset(f"worker:{g}:failed:data", jid, json.dumps(rec))
    c = Client(make_app(cfg, redis_client=r))
    status, _, page = c.get("/")
    assert status == 200 and "mail" in page and "exports" in page and "<small>(slow)</small>" in page
    for jid in (j1, j2):
        status, _, page = c.get(f"/jobs/{jid}")
        assert status == 200 and jid in page
    status, _, body = c.get("/hirefire/" + "h" * 24 + "/info")  # a group per process type, its backlog
    assert status == 200 and json.loads(body) == [{"name": "fast", "value": 1}, {"name": "slow", "value": 1}]
    status, _, page = c.get("/failed")
    assert status == 200 and "boom fast" in page and "boom slow" in page
    status, _, _ = c.post("/queues/exports/pause", {})
    assert status == 303 and r.smembers("worker:slow:paused") == {"exports"}
    status, _, _ = c.post("/failed/retry", {"id": ["ffail", "sfail"]})
    assert status == 303 and r.zcard("worker:fast:failed") == 0 and r.zcard("worker:slow:failed") == 0


def _groups_on_each_primary(cr, redis_cluster, prefix="worker") -> dict:
    """``{port: group}``: a group name whose ``{prefix:group}`` hash tag's slot each primary holds (CLUSTER KEYSLOT)."""
    out = {}
    for i in range(200):
        name = f"g{i}"
        port = redis_cluster.node_of("{" + f"{prefix}:{name}" + "}")
        out.setdefault(port, name)
        if len(out) == len(redis_cluster.ports):
            return out
    raise AssertionError(f"no group name for every primary: {out}")


def test_three_groups_on_three_primaries_drained_by_a_worker_each(env, r, spawn, redis_cluster, redis_server):
    """Issue 26 point 2 on a cluster: three groups whose hash tags land on the three primaries (CLUSTER KEYSLOT);
    the producer writes each group's jobs in its slot only (CLUSTER COUNTKEYSINSLOT on its primary, nothing of it
    elsewhere); a worker per group drains its group; status and the failed registry see all three."""
    redis_cluster.flush()
    cr = redis.RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    try:
        by_port = _groups_on_each_primary(cr, redis_cluster)
        names = list(by_port.values())
        e = dict(env, REDIS_URL=redis_cluster.url, REDIS_CLUSTER="1", EVENTS_REDIS_URL=redis_server.url,
                 HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="2",
                 QUEUE_GROUPS=";".join(f"{g}=q{g}" for g in names))
        b = broker_for(e)
        n = 200
        for k, g in enumerate(names):
            b.push_many("push", [["out", k * 1000 + i] for i in range(n)], queue=f"q{g}")
        b.push("fail", ["boom"], {}, queue=f"q{names[1]}")
        for port, g in by_port.items():
            tag = "{" + f"worker:{g}" + "}"
            slot = cr.keyslot(tag)
            node = redis.Redis(port=port)
            assert node.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) > 0, (g, port)
            node.close()
        for port in redis_cluster.ports:  # every key on a node is of the group whose slot it holds
            node = redis.Redis(port=port, decode_responses=True)
            keys = node.keys("*")
            assert keys and all(k.startswith("{worker:" + by_port[port] + "}:") for k in keys), (port, keys[:5])
            node.close()
        workers = [spawn("--burst", **dict(e, QUEUES=f"@{g}")) for g in names]
        for w in workers:
            assert w.wait(120) == 0, w.output
        done = sorted(int(x) for x in r.lrange("out", 0, -1))
        assert done == sorted(k * 1000 + i for k in range(3) for i in range(n))
        doc = json.loads(run_cli(e, "status", "--json").stdout)
        assert doc["totals"] == {"processed": 3 * n, "failed": 1}, doc["totals"]
        assert sorted(g["name"] for g in doc["groups"]) == sorted(names)
        assert json.loads(run_cli(e, "failed", "--json").stdout)["count"] == 1
        b.r.close()
    finally:
        cr.close()


@pytest.mark.timeout(60)
def test_a_job_group_lives_in_its_queues_group_and_is_found_there(env, r, spawn):
    """worker.group under QUEUE_GROUPS (issue 25 item 4 meets issue 26 point 2): the group's count is kept by the
    scripts that record its members' ends, so the group, its members and its callback go to their queues' key space
    (its hash slot); a group spanning two queue groups is refused before anything is written; get_group and the
    callback's results= find it there. (Found when the two branches were merged: the group went to the ungrouped
    prefix, where no worker of either group would ever count it.)"""
    import tests.jobs_groups as gj
    from worker import get_group, group, jobs
    e = genv(env)
    b = broker_for(e)
    before = jobs.current_broker()
    jobs.use(b)
    try:
        with pytest.raises(ValueError, match="one queue group"):
            group([gj.g_send.options(queue="reports").call("qg", 1)],
                  on_complete=gj.g_report.options(queue="mail").call("qg")).enqueue()
        assert r.keys("*") == []
        gid = group([gj.g_send.options(queue="reports").call("qg", n) for n in range(3)],
                    on_complete=gj.g_report.options(queue="exports").call("qg")).enqueue()
        assert r.exists(f"worker:slow:group:{gid}") and not r.exists(f"worker:group:{gid}")
        assert get_group(gid)["total"] == 3
        w = spawn("--burst", **dict(e, QUEUES="@slow", JOB_MODULES="tests.jobs,tests.jobs_groups"))
        assert w.wait(60) == 0, w.output
        (rep,) = [json.loads(x) for x in r.lrange("qg:report", 0, -1)]
        assert [(x["status"], x["result"]) for x in rep["results"]] == [("done", 0), ("done", 10), ("done", 20)]
        g = get_group(gid)
        assert (g["done"], g["pending"], g["callback"]["status"]) == (3, 0, "done")
    finally:
        jobs.use(before)


def test_no_group_may_be_named_like_a_word_of_the_key_schema_including_the_limit_keys():
    """Adversarial review of issue 25: issue 25 added P:running:, P:held:, P:rate: and P:unique:, but KEY_WORDS
    (the group names refused because ``KEY_PREFIX:<group>:...`` would share key names with an ungrouped deployment's
    ``KEY_PREFIX:<word>:...``) was not extended: ``QUEUE_GROUPS=running=a`` was accepted, and its P:queues
    (``worker:running:queues``, a set) is the concurrency hash of a job named "queues". Every ``P:<word>`` that
    keys.py or a Lua script names is now refused as a group name."""
    import pathlib
    from worker import groups
    root = pathlib.Path(__file__).resolve().parent.parent / "worker"
    text = (root / "keys.py").read_text() + "".join(p.read_text() for p in (root / "lua").glob("*.lua"))
    words = set(re.findall(r"\bP:([a-z_]+)", text))
    assert {"running", "held", "rate", "unique"} <= words
    assert words <= groups.KEY_WORDS, sorted(words - groups.KEY_WORDS)
    for w in sorted(words):
        with pytest.raises(groups.GroupsError, match="word of the key schema"):
            groups.queue_groups(f"{w}=a")


def test_an_id_in_two_groups_is_found_where_it_still_waits(env, r, redis_server, monkeypatch):
    """Adversarial review of issue 25/26: a producer's own job id (job_id=) may be used in two groups: canceled (its
    record kept RESULT_TTL) in group fast, then enqueued again in group slow. cancel(id), get_job(id) and the read
    model looked in the first group holding any record, answered 'canceled' and left the waiting job in slow to run.
    The group where the job still waits (queued or scheduled) wins."""
    from worker import control
    from worker.api_groups import read_model
    b = broker_for(genv(env))
    assert b.push("push", ["out", 1], {}, queue="mail", job_id="mine") == "mine"
    assert control.cancel_job(b, "mine") == (True, "")
    assert b.push("push", ["out", 2], {}, queue="reports", job_id="mine") == "mine"
    assert r.hget("worker:fast:job:mine", "status") == "canceled" and r.llen("worker:slow:queue:reports") == 1
    assert b.find("mine").keys.prefix == "worker:slow"
    cfg = worker.config.from_mapping(genv(env))
    assert read_model(b.r, cfg).job("mine")["group"] == "slow"
    import worker as api
    from worker import aio_broker
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    monkeypatch.setenv("QUEUE_GROUPS", GROUPS)

    async def go():
        job = await api.get_job_async("mine")
        await aio_broker.close()
        return job
    job = asyncio.run(go())
    assert (job.status, job.queue) == ("queued", "reports")
    assert control.cancel_job(b, "mine") == (True, "")
    assert r.llen("worker:slow:queue:reports") == 0 and r.hget("worker:slow:job:mine", "status") == "canceled"
    b.r.close()
