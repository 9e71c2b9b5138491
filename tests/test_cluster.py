"""Redis Cluster (issue 26): the runtime on a real local cluster of 3 primaries (tests/support.py LocalCluster).

The cluster is one per session (``redis_cluster`` in conftest.py); each test flushes every primary first. Jobs
record what they did on the session's single redis-server (``EVENTS_REDIS_URL``), not on the cluster under test.
"""
from __future__ import annotations

import json
import threading

import pytest
import redis

import worker.config
from tests.conftest import run_cli
from tests.support import wait_until
from worker.client import connect, is_cluster
from worker.config import ConfigError
from worker.fetch import Broker


@pytest.fixture
def cr(redis_cluster):
    """A cluster client on flushed primaries."""
    redis_cluster.flush()
    c = redis.RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    yield c
    c.close()


@pytest.fixture
def cenv(env, r, redis_cluster, redis_server):
    """Worker environment on the cluster; job events go to the single server (``r``)."""
    return dict(env, REDIS_URL=redis_cluster.url, REDIS_CLUSTER="1", EVENTS_REDIS_URL=redis_server.url,
                HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="2")


def broker_for(cenv) -> Broker:
    cfg = worker.config.from_mapping(cenv)
    return Broker(connect(cfg, name="test"), cfg)


def all_keys(cr) -> list:
    return sorted(cr.keys(target_nodes=redis.RedisCluster.ALL_NODES))


def test_local_cluster_is_up(redis_cluster, cr):
    """Issue 26 point 4: three primaries sharing the 16384 slots, every node in cluster_state:ok."""
    assert len(cr.get_primaries()) == 3
    assert cr.cluster_info()["cluster_state"] == "ok"


def test_cluster_config_wraps_the_prefix_in_one_hash_tag_and_refuses_what_a_cluster_lacks():
    """Issue 26 point 1: REDIS_CLUSTER=1 makes every key ``{KEY_PREFIX}:...``; unix sockets and db != 0 are refused."""
    cfg = worker.config.from_mapping({"REDIS_CLUSTER": "1", "KEY_PREFIX": "app", "REDIS_URL": "rediss://h:6380"})
    assert cfg.redis_cluster and cfg.key_prefix == "{app}"
    assert worker.config.from_mapping({}).key_prefix == "worker"
    for url, word in (("unix:///tmp/r.sock", "TCP"), ("redis://h:6379/2", "database 0")):
        with pytest.raises(ConfigError, match=f"REDIS_CLUSTER.*{word}"):
            worker.config.from_mapping({"REDIS_CLUSTER": "1", "REDIS_URL": url})
    with pytest.raises(ConfigError, match="REDIS_CLUSTER"):
        worker.config.from_mapping({"REDIS_CLUSTER": "maybe"})


def test_worker_producer_and_cli_on_a_cluster_keep_every_key_in_one_slot(cenv, cr, r, spawn, redis_cluster):
    """Issue 26 point 1: producer (push, push_many), a worker, `enqueue`, `status` and `failed` on the cluster client;
    every key the runtime wrote is ``{worker}:...`` on the one primary that holds that slot."""
    b = broker_for(cenv)
    assert is_cluster(b.r)
    ids = [b.push("push", ["out", i], {}) for i in range(5)]
    ids += b.push_many("push", [["out", 100 + i] for i in range(20)])
    assert run_cli(cenv, "enqueue", "push", "--args", '["out", 999]').returncode == 0
    b.push("fail", ["boom"], {})
    w = spawn("--burst", **{k: v for k, v in cenv.items() if k not in ("PATH",)})
    assert w.wait(60) == 0, w.output
    assert sorted(int(x) for x in r.lrange("out", 0, -1)) == sorted([*range(5), *range(100, 120), 999])
    status = json.loads(run_cli(cenv, "status", "--json").stdout)
    assert status["totals"] == {"processed": 26, "failed": 1} and status["failed"] == 1, status
    assert "boom" in run_cli(cenv, "failed").stdout
    keys = all_keys(cr)
    assert keys and all(k.startswith("{worker}:") for k in keys), keys
    home = redis_cluster.node_of("{worker}")
    for port in redis_cluster.ports:
        n = redis.Redis(port=port).dbsize()
        assert (n > 0) == (port == home), (port, home, n)
    b.r.close()


def test_slot_migration_while_four_workers_drain_2000_jobs_runs_each_once(cenv, cr, r, spawn, redis_cluster):
    """Issue 26 point 3: the key space's hash slot moves to another primary (IMPORTING/MIGRATING, MIGRATE in
    batches, SETSLOT NODE) while 4 workers drain 2,000 jobs: every job runs exactly once, nothing is left behind or
    failed. While the slot is half-moved a script's keys are split between two nodes, so Redis answers TRYAGAIN (or
    ASK, followed by redis-py with ASKING): the workers log ``redis.unavailable`` and retry until it has moved, then
    go on against the new primary (MOVED)."""
    b = broker_for(cenv)
    n = 2000
    b.push_many("push", [["out", i] for i in range(n)])
    workers = [spawn("--burst", **cenv) for _ in range(4)]
    wait_until(lambda: r.llen("out") >= 100, timeout=60, what="the first 100 jobs")
    home = redis_cluster.node_of("{worker}")
    target = next(p for p in redis_cluster.ports if p != home)

    def between():  # after the first batch, hold the slot half-moved until the workers have met it
        wait_until(lambda: any("event=redis.unavailable" in w.output for w in workers), timeout=30,
                   what="a worker to meet the half-moved slot (TRYAGAIN/ASK)")

    moved = redis_cluster.migrate_slot("{worker}", target, batch=100, between=between)
    assert moved > 0 and redis_cluster.node_of("{worker}") == target
    for w in workers:
        assert w.wait(120) == 0, w.output
    done = [int(x) for x in r.lrange("out", 0, -1)]
    assert len(done) == n and sorted(done) == list(range(n)), (len(done), len(set(done)))
    status = json.loads(run_cli(cenv, "status", "--json").stdout)
    assert status["totals"] == {"processed": n, "failed": 0}, status
    assert not cr.keys("{worker}:processing:*"), "a claim was left behind"
    b.r.close()


def test_a_pipeline_sent_to_the_slots_old_node_raises_a_retryable_error_and_the_next_goes_to_the_new(
        cenv, cr, redis_cluster):
    """Issue 26 point 3: pipelines (MULTI, TIME, scripts) go to the node that held the slot when last looked up; after
    the slot moved, its MOVED is raised as a ConnectionError (which every caller retries like an outage, and a MULTI
    refused by MOVED applied nothing) after re-reading the slot map, so the retry goes to the new primary."""
    b = broker_for(cenv)
    b.register("w:1", {"host": "h"})
    assert b.claims_and_recovered("w:1") == ([], set())
    home = redis_cluster.node_of("{worker}")
    redis_cluster.migrate_slot("{worker}", next(p for p in redis_cluster.ports if p != home))
    with pytest.raises(redis.ConnectionError, match="cluster slot moved"):
        b.claims_and_recovered("w:1")
    assert b.claims_and_recovered("w:1") == ([], set())
    b.register("w:1", {"host": "h"})
    b.r.close()


def test_primary_killed_with_jobs_in_flight_its_replica_takes_over_and_nothing_is_lost(
        env, r, spawn, redis_cluster_ha, redis_server):
    """Issue 26 point 3: the primary holding the key space is SIGKILLed while 2 workers drain 600 jobs (its replica
    caught up: ``WAIT``); the replica is promoted (cluster-node-timeout 2 s) and the workers, through redis-py's
    cluster client, go on against it: every job runs, none twice (the epoch, replicated, is unchanged)."""
    c = redis_cluster_ha
    cenv = dict(env, REDIS_URL=f"redis://127.0.0.1:{c.ports[0]}/0", REDIS_CLUSTER="1",
                EVENTS_REDIS_URL=redis_server.url, HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="2")
    b = broker_for(cenv)
    n = 600
    b.push_many("push", [["out", i] for i in range(n)])
    home = c.node_of("{worker}")
    replica = c.replica_of(home)
    workers = [spawn("--burst", **cenv) for _ in range(2)]
    wait_until(lambda: r.llen("out") >= 50, timeout=60, what="the first 50 jobs")
    primary = redis.Redis(port=home)
    primary.execute_command("WAIT", 1, 2000)  # what the replica misses is lost by any failover (docs/cluster.md)
    primary.close()
    c.kill(home)
    wait_until(lambda: c.node_of("{worker}") == replica, timeout=30, what="the replica to be promoted")
    for w in workers:
        assert w.wait(120) == 0, w.output
    done = [int(x) for x in r.lrange("out", 0, -1)]
    assert sorted(set(done)) == list(range(n)), f"lost: {sorted(set(range(n)) - set(done))[:10]}"
    assert len(done) == n, f"{len(done) - n} ran twice"
    b.r.close()


def test_a_tls_cluster_with_a_self_signed_certificate_works_as_a_single_primary_does(
        env, r, redis_server, tmp_path, spawn):
    """Issue 26 point 1: ``rediss://`` to a cluster whose nodes (and cluster bus) speak TLS only, with a self-signed
    certificate as Heroku-style managed Redis presents: not verified unless REDIS_TLS_VERIFY; producer, worker and
    `status` work."""
    import shutil
    import subprocess

    from tests.support import LocalCluster
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed (needed to make a self-signed certificate)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost"], check=True, capture_output=True)
    cluster = LocalCluster(tmp_path, tls=(cert, key))
    try:
        cluster.start()
        cenv = dict(env, REDIS_URL=cluster.url, REDIS_CLUSTER="1", EVENTS_REDIS_URL=redis_server.url)
        assert cenv["REDIS_URL"].startswith("rediss://")
        b = broker_for(cenv)
        b.push_many("push", [["out", i] for i in range(20)])
        w = spawn("--burst", **cenv)
        assert w.wait(60) == 0, w.output
        assert sorted(int(x) for x in r.lrange("out", 0, -1)) == list(range(20))
        assert json.loads(run_cli(cenv, "status", "--json").stdout)["totals"]["processed"] == 20
        b.r.close()
    finally:
        cluster.stop()


def test_the_supervisors_script_call_after_the_slot_moved_is_resent_where_it_belongs(cenv, cr, redis_cluster):
    """Issue 26 point 3: the supervisor's calls (client.Link) are sent to the slot's node and awaited in its select;
    after the slot moved, the old node's MOVED makes the call go again through redis-py's cluster client (the node
    refused it, nothing ran), so it succeeds on the new primary instead of failing."""
    import os

    from worker.client import Link
    b = broker_for(cenv)
    rfd, wfd = os.pipe()
    try:
        b.link = Link(b.r, rfd, lambda: None, lambda: 1.0)
        b.register("w:1", {"host": "h"})
        b.heartbeat("w:1")
        b.push("push", ["out", 1], {})
        home = redis_cluster.node_of("{worker}")
        redis_cluster.migrate_slot("{worker}", next(p for p in redis_cluster.ports if p != home))
        c = b.cycle("w:1", claim=[0])  # through the Link: MOVED from the old node, then the new one claims
        assert len(c.claims) == 1
    finally:
        os.close(rfd)
        os.close(wfd)
        b.r.close()


def test_keyless_reads_ask_the_node_that_holds_the_key_space(cenv, cr, redis_cluster):
    """Issue 26 point 1: TIME (the clock recovery compares deadlines with) and INFO (the start-up check of
    maxmemory-policy) come from the key space's own primary, not any node or every node merged."""
    home = redis_cluster.node_of("{worker}")
    other = next(p for p in redis_cluster.ports if p != home)
    redis.Redis(port=other).config_set("maxmemory-policy", "allkeys-lru")
    b = broker_for(cenv)
    try:
        assert b.check_server() is None  # the home node keeps noeviction
        assert b.r.info("server")["tcp_port"] == home
        redis.Redis(port=home).config_set("maxmemory-policy", "allkeys-lru")
        assert "allkeys-lru" in (b.check_server() or "")
    finally:
        for p in redis_cluster.ports:
            redis.Redis(port=p).config_set("maxmemory-policy", "noeviction")
        b.r.close()


def test_periodic_jobs_on_a_cluster_enqueue_each_tick_once_through_a_sigkill(cenv, cr, spawn):
    """Issue 26 point 1 (cron on a cluster): 2 workers with an every-second schedule, one SIGKILLed and restarted
    mid-run: each of 5 ticks is enqueued exactly once, into ``{worker}:queue:sched``."""
    mods = "worker.sample,tests.jobs_schedule"

    def ticks():
        return [json.loads(p)["tick"] for p in cr.lrange("{worker}:queue:sched", 0, -1)]

    workers = [spawn(**dict(cenv, JOB_MODULES=mods)) for _ in range(2)]
    wait_until(lambda: ticks(), 20, "the first tick")
    t0 = ticks()[0]
    wait_until(lambda: max(ticks()) >= t0 + 2, 20, "tick 2")
    workers[0].kill_tree()
    workers[0] = spawn(**dict(cenv, JOB_MODULES=mods))
    wait_until(lambda: max(ticks()) >= t0 + 5, 30, "five ticks")
    seen = [t for t in ticks() if t < t0 + 5]
    assert sorted(seen) == [t0 + i for i in range(5)], seen


def test_a_sigkilled_workers_job_is_recovered_by_another_on_a_cluster(cenv, cr, r, spawn):
    """Issue 26 point 1 (recovery on a cluster): recover.lua builds the dead worker's keys from the prefix in KEYS[1];
    a worker SIGKILLed mid-job (whole tree) is found dead by another, whose recovery puts the job back and runs it."""
    from tests.support import next_event
    b = broker_for(cenv)
    b.push("term_probe", ["ev"], {"seconds": 1})
    doomed = spawn(**cenv)
    assert next_event(r, "ev")["event"] == "started"
    doomed.kill_tree()
    rescuer = spawn(**cenv)
    assert next_event(r, "ev", timeout=30)["event"] == "started", rescuer.output
    assert next_event(r, "ev", timeout=30)["event"] == "completed"
    rescuer.wait_for(r"event=recovery\.requeued", timeout=5)
    b.r.close()


def test_sigterm_on_a_cluster_puts_the_running_job_back_and_exits_in_the_window(cenv, cr, r, spawn):
    """Issue 26 point 1 (shutdown on a cluster): SIGTERM mid-job: the job gets TermException (ignores it, or is
    interrupted before its handler) and is put back at the head of ``{worker}:queue:default`` (its claim gone from
    the processing list), and the worker exits 0 in time."""
    import signal
    import time

    from tests.support import next_event
    b = broker_for(cenv)
    job_id = b.push("term_probe", ["ev"], {"seconds": 60, "swallow": True})
    w = spawn(**dict(cenv, SHUTDOWN_WINDOW="4"))
    assert next_event(r, "ev")["event"] == "started"
    t0 = time.monotonic()
    w.signal(signal.SIGTERM)
    w.wait_for(r"event=shutdown\.job_put_back")
    assert w.wait(10) == 0, w.output
    assert time.monotonic() - t0 < 4
    assert [json.loads(p)["id"] for p in cr.lrange("{worker}:queue:default", 0, -1)] == [job_id]
    assert not cr.keys("{worker}:processing:*")
    b.r.close()


def test_wait_and_cancel_on_a_cluster(cenv, cr, r, spawn):
    """Issue 26 point 1 with issue 24's controls: ``cancel`` of a queued job and ``get_job(id).wait()`` (BLPOP on the
    job's done list) through the module-level broker on the cluster client."""
    from worker import cancel, get_job, jobs
    b = broker_for(cenv)
    jobs.use(b)
    try:
        doomed = b.push("push", ["out", "doomed"], {})
        assert cancel(doomed)
        kept = b.push("push", ["out", "kept"], {})
        w = spawn(**cenv)
        assert get_job(kept).wait(30).status == "done", w.output
        assert get_job(doomed).status == "canceled"
        assert r.lrange("out", 0, -1) == ["kept"]
    finally:
        jobs.use(None)
        b.r.close()
