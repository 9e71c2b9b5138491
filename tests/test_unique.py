"""Unique jobs (issue 25 item 1): ``@job(unique=True)`` / ``@job(unique=("user_id",))``. The lock IS the job id
(payload.unique_id, derived from the bound arguments), so enqueue.lua's own-id dedupe is the whole lock: while the job
is queued, scheduled or running (a retry, a put-back and a recovery keep its id), enqueueing it again enqueues
nothing and returns its id; the script call that records its end (done, failed, canceled) frees it."""
import json
import signal
import time

import pytest

import worker
from tests import dyno
from tests.support import wait_until
from worker import cancel, jobs, testing
from worker.keys import Keys
from worker.results import get_job

MODULES = "worker.sample,tests.jobs,tests.jobs_unique"
K = Keys()
FAST = {"HEARTBEAT_INTERVAL": "0.5", "HEARTBEAT_TTL": "2", "JOB_MODULES": MODULES}


@pytest.fixture
def uj(r, module_broker):
    import tests.jobs_unique as uj
    module_broker(MODULES)
    return uj


def queued(r, queue="default"):
    return r.llen(K.queue(queue)) + r.zcard(K.scheduled)


@pytest.mark.timeout(30)
def test_same_arguments_enqueue_one_job_and_return_its_id(r, uj):
    a = uj.ugate.enqueue("u1", 7)
    assert uj.ugate.enqueue("u1", 7) == a and a.startswith("u:ugate:")
    assert uj.ugate.enqueue("u1", user_id=7) == a            # keyword
    assert uj.ugate.enqueue(key="u1", user_id=7, note="") == a  # defaults applied
    assert jobs.enqueue("ugate", "u1", 7) == a                 # by name
    assert uj.ugate.options(queue="default").enqueue("u1", 7) == a
    assert queued(r) == 1 and get_job(a).status == "queued"
    b = uj.ugate.enqueue("u1", 8)
    assert b != a and queued(r) == 2                          # other arguments: another job
    later = uj.ugate.enqueue_in(60, "u1", 9)
    assert uj.ugate.enqueue_in(60, "u1", 9) == later and uj.ugate.enqueue("u1", 9) == later  # scheduled
    assert queued(r) == 3
    assert jobs.enqueue_many("ugate", [("u1", 7), ("u1", 10), ("u1", 10)]) == [a, *[uj.ugate.enqueue("u1", 10)] * 2]
    assert queued(r) == 4


@pytest.mark.timeout(30)
def test_unique_on_named_arguments_ignores_the_others(r, uj):
    a = uj.uby_user.enqueue("u2", 1, note="first")
    assert uj.uby_user.enqueue("other-key", user_id=1, note="second") == a
    assert uj.uby_user.enqueue("u2", 2) != a
    assert queued(r) == 2
    assert json.loads(r.lindex(K.queue("default"), 0))["kwargs"] == {"note": "first"}  # the first call's arguments


@pytest.mark.timeout(30)
def test_an_own_job_id_wins_over_the_derived_one(r, uj):
    a = uj.ugate.enqueue("u3", 1)
    assert uj.ugate.options(job_id="mine-1").enqueue("u3", 1) == "mine-1"
    assert queued(r) == 2 and a != "mine-1"


def test_unique_is_checked_at_decoration():
    from worker import job
    for bad in [("nope",), "key", ["key"], (), 1, ("key", 2)]:
        with pytest.raises(TypeError, match="unique"):
            job(name=f"bad_unique_{bad!r}", unique=bad)(lambda key: key)


@pytest.mark.timeout(60)
def test_running_keeps_the_key_and_done_frees_it(r, uj, spawn):
    a = uj.ugate.enqueue("u4", 1, note="one")
    w = spawn(JOB_MODULES=MODULES)
    assert r.blpop(["u4:started"], 20)
    assert uj.ugate.enqueue("u4", 1, note="one") == a and queued(r) == 0  # running: nothing enqueued
    r.rpush("u4:go", "first")
    assert get_job(a).wait(timeout=20).result == "first"
    assert uj.ugate.enqueue("u4", 1, note="one") == a                  # ended: the key is free again
    assert r.blpop(["u4:started"], 20)
    r.rpush("u4:go", "second")
    assert get_job(a).wait(timeout=20).result == "second"
    assert r.llen("u4:runs") == 2
    w.signal(15)
    assert w.wait(15) == 0


@pytest.mark.timeout(60)
def test_a_retry_keeps_the_key_and_a_permanent_failure_frees_it(r, uj, spawn):
    a = uj.ufail_once.enqueue("u5")
    w = spawn(JOB_MODULES=MODULES)
    assert r.blpop(["u5:started"], 20)
    r.rpush("u5:go", "x")
    wait_until(lambda: get_job(a).status == "scheduled", 20, "its retry scheduled")
    assert uj.ufail_once.enqueue("u5") == a and r.zcard(K.scheduled) == 1 and r.llen(K.queue("default")) == 0
    assert r.blpop(["u5:started"], 20) == ("u5:started", "2")  # the retry, under the same id
    assert uj.ufail_once.enqueue("u5") == a and queued(r) == 0
    r.rpush("u5:go", "x")
    assert get_job(a).wait(timeout=20).result == 2
    f = uj.ufail.enqueue("u6")
    assert get_job(f).wait(timeout=20).status == "failed"
    assert uj.ufail.enqueue("u6") == f                               # failed for good: free again
    wait_until(lambda: r.llen("u6:started") == 2, 20, "the second run")
    assert get_job(f).wait(timeout=20).status == "failed"
    w.signal(15)
    assert w.wait(15) == 0


@pytest.mark.timeout(60)
def test_failed_retry_of_a_unique_job_whose_key_is_taken_again_leaves_it_failed(r, uj, spawn, cli):
    """A unique job failed for good frees its key; an equal job enqueued since holds it under the same id. `failed
    retry` put the failed one back all the same: two queued jobs of one id, two runs of one key at once. Now it stays
    failed (and says why) until the key is free again."""
    from worker.failed import FailedRegistry
    w = spawn(JOB_MODULES=MODULES)
    f = uj.ufail.enqueue("u12")
    assert get_job(f).wait(timeout=20).status == "failed"
    w.signal(15)
    assert w.wait(15) == 0
    assert uj.ufail.enqueue("u12") == f and queued(r) == 1          # the key is taken again
    res = cli("failed", "retry", f, JOB_MODULES=MODULES)
    assert res.returncode == 1 and "queued or running again" in res.stdout
    assert queued(r) == 1 and FailedRegistry(jobs.default_broker()).ids() == [f]
    r.delete(K.queue("default"))
    r.hset(K.job(f), "status", "canceled")                            # ended: the key is free
    assert FailedRegistry(jobs.default_broker()).retry([f]) == [f] and queued(r) == 1


@pytest.mark.timeout(30)
def test_cancel_frees_the_key(r, uj):
    a = uj.ugate.enqueue_in(60, "u7", 1)
    assert cancel(a) is True and get_job(a).status == "canceled"
    assert uj.ugate.enqueue_in(60, "u7", 1) == a and get_job(a).status == "scheduled" and queued(r) == 1


@pytest.mark.timeout(60)
def test_canceling_a_running_unique_job_frees_the_key(r, uj, spawn):
    a = uj.ugate.enqueue("u10", 1)
    w = spawn(JOB_MODULES=MODULES, HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="3")
    assert r.blpop(["u10:started"], 20)
    assert cancel(a, running=True) is True
    assert get_job(a).wait(timeout=20).status == "canceled"
    assert uj.ugate.enqueue("u10", 1) == a and r.blpop(["u10:started"], 20)  # runs again: the key was free
    r.rpush("u10:go", "x")
    assert get_job(a).wait(timeout=20).status == "done"
    w.signal(15)
    assert w.wait(15) == 0


@pytest.mark.timeout(90)
def test_a_put_back_keeps_the_key(r, uj, spawn):
    """Heroku-style stop (SIGTERM to every process of the dyno): the running job is put back under its id; the app's
    enqueues in between return that id and add nothing; the next worker runs it once, then the key is free."""
    a = uj.ugate.enqueue("u8", 1)
    w = spawn(JOB_MODULES=MODULES)
    assert r.blpop(["u8:started"], 20)
    dyno.shutdown(w.pid, window=10)
    wait_until(lambda: r.llen(K.queue("default")) == 1, 20, "the job put back")
    assert get_job(a).status == "queued"
    assert uj.ugate.enqueue("u8", 1) == a and queued(r) == 1
    spawn(JOB_MODULES=MODULES)
    assert r.blpop(["u8:started"], 20)
    assert uj.ugate.enqueue("u8", 1) == a and queued(r) == 0
    r.rpush("u8:go", "x")
    assert get_job(a).wait(timeout=20).status == "done"
    assert uj.ugate.enqueue("u8", 1) == a and queued(r) == 1      # free again


@pytest.mark.timeout(120)
def test_a_sigkilled_unique_job_is_recovered_while_the_app_reenqueues_and_never_runs_twice_at_once(r, uj, spawn):
    """The failure mode of peers' locks: a worker SIGKILLed mid-run (a dyno crash, an OOM kill) strands the lock, or
    a TTL lets a duplicate in. Here the app keeps enqueueing the same call while worker A is killed and worker B
    recovers the job: every enqueue returns the same id, nothing else is queued, the runs never overlap, and the key
    is free once the recovered run is done."""
    a = spawn(DYNO="worker.1", **FAST)
    job_id = uj.ugate.enqueue("u9", 1)
    assert r.blpop(["u9:started"], 20)
    b = spawn(DYNO="worker.2", **FAST)
    b.wait_for(r"event=worker.start")
    a.kill_tree()
    killed = time.time()
    ids = {uj.ugate.enqueue("u9", 1)}  # at least once before the recovery
    while not r.llen("u9:started"):  # the app keeps enqueueing until the recovered run starts
        ids.add(uj.ugate.enqueue("u9", 1))
        assert r.llen(K.queue("default")) <= 1 and r.zcard(K.scheduled) == 0
        time.sleep(0.05)
    assert ids == {job_id}
    b.wait_for(rf"event=recovery\.requeued job={job_id}")
    assert uj.ugate.enqueue("u9", 1) == job_id and queued(r) == 0          # running on B: still held
    r.rpush("u9:go", "x")
    assert get_job(job_id).wait(timeout=20).status == "done"
    runs = [json.loads(x) for x in r.lrange("u9:runs", 0, -1)]
    ends = [json.loads(x) for x in r.lrange("u9:ends", 0, -1)]
    assert len(runs) == 2 and len(ends) == 1                                # the killed run never ended
    assert runs[1]["start"] > killed and runs[1]["pid"] != runs[0]["pid"]   # the second began after the kill
    b.signal(signal.SIGTERM)  # idle B would claim the next enqueue at once (seen once in a full run)
    assert b.wait(15) == 0, b.output
    assert uj.ugate.enqueue("u9", 1) == job_id and queued(r) == 1           # the key is free at the end


@pytest.mark.timeout(30)
def test_the_async_producer_derives_the_same_id(r, uj, redis_server, monkeypatch):
    import asyncio

    from worker import aio_broker
    monkeypatch.setenv("REDIS_URL", redis_server.url)

    async def produce():
        ids = [await uj.ugate.enqueue_async("u11", 1), await uj.ugate.enqueue_async("u11", user_id=1),
               await uj.ugate.enqueue_in_async(60, "u11", 1)]
        held = [await uj.ustart.enqueue_async("u11s", 1), await uj.ustart.enqueue_async("u11s", 1)]  # "start"
        await aio_broker.close()
        return ids, held
    ids, held = asyncio.run(produce())
    assert ids == [uj.ugate.enqueue("u11", 1)] * 3 and held == [uj.ustart.enqueue("u11s", 1)] * 2 and queued(r) == 2


def test_inline_mode_honours_unique():
    import tests.jobs_unique as uj
    with testing.inline(run_scheduled=False) as ctx:
        a = uj.uquick.enqueue_in(60, 1)
        assert uj.uquick.enqueue_in(60, a=1, b=2) == a and uj.uquick.enqueue(1) == a and len(ctx.jobs) == 1
        assert uj.uquick.enqueue(2) != a and len(ctx.jobs) == 2
        assert ctx.run_scheduled() == [a] and ctx.get(a)["result"] == 3
        assert uj.uquick.enqueue(1) == a and ctx.get(a)["status"] == "done" and len(ctx.jobs) == 2
        assert uj.uquick.options(job_id="own").enqueue(1) == "own"
        assert worker.enqueue_many("uquick", [(1,), (1,)]) == [a, a]


# --- unique_until="start" (issue 25 item 1): the key is freed when the job starts ---

def lock_of(job_id):
    from worker.payload import unique_lock
    return K.unique(unique_lock(job_id))


def test_unique_until_is_checked_at_decoration():
    from worker import job
    with pytest.raises(ValueError, match="unique_until"):
        job(name="bad_until", unique=True, unique_until="later")(lambda key: key)
    with pytest.raises(TypeError, match="unique_until"):
        job(name="bad_until2", unique_until="start")(lambda key: key)


@pytest.mark.timeout(30)
def test_unique_until_start_holds_the_key_while_queued_and_scheduled(r, uj):
    a = uj.ustart.enqueue("s1", 1)
    assert a.startswith("us:ustart:") and r.get(lock_of(a)) == a
    assert uj.ustart.enqueue("s1", user_id=1) == a and queued(r) == 1     # waiting: one job
    later = uj.ustart.enqueue_in(60, "s1", 2)
    assert uj.ustart.enqueue("s1", 2) == later and queued(r) == 2          # scheduled: held too
    assert jobs.enqueue_many("ustart", [("s1", 1), ("s1", 2)]) == [a, later] and queued(r) == 2
    assert cancel(later) is True and r.get(lock_of(later)) is None          # canceled: freed at once
    again = uj.ustart.enqueue_in(60, "s1", 2)
    assert again not in (later, a) and lock_of(again) == lock_of(later) and queued(r) == 2
    r.hset(K.job(a), "status", "done")  # the holder's record alone decides (no TTL): an ended holder frees it
    b = uj.ustart.enqueue("s1", 1)
    assert b != a and r.get(lock_of(a)) == b and queued(r) == 3
    r.delete(K.job(b))                  # gone (RESULT_TTL 0, or deleted by hand): free as well
    assert uj.ustart.enqueue("s1", 1) not in (a, b)


@pytest.mark.timeout(30)
def test_unique_until_start_enqueue_script_edge_cases(r, uj, module_broker):
    """A repeated call (redis-py re-sends after a timeout) gets the first copy's answer; a lock key of the wrong
    type refuses the call before any write."""
    from worker.lua import calls
    b = module_broker(MODULES)
    job_id, call = b.push_call("ustart", ("s2", 1), {})
    assert calls.enqueued_id(job_id, b.scripts.run(call)) == job_id
    assert calls.enqueued_id(job_id, b.scripts.run(call)) == job_id and queued(r) == 1  # the same call again
    other, call2 = b.push_call("ustart", ("s2", 1), {})
    assert other != job_id and calls.enqueued_id(other, b.scripts.run(call2)) == job_id
    assert calls.enqueued_id(other, b.scripts.run(call2)) == job_id and queued(r) == 1
    r.delete(lock_of(job_id))
    r.hset(lock_of(job_id), "x", "1")
    with pytest.raises(Exception, match="WRONGTYPE .*unique.* nothing enqueued"):
        uj.ustart.enqueue("s2", 1)
    assert queued(r) == 1


@pytest.mark.timeout(60)
def test_unique_until_start_frees_the_key_when_the_job_starts(r, uj, spawn):
    """While the first runs, one equal job may queue (never two); the running one is not its holder."""
    a = uj.ustart.enqueue("s3", 1)
    w = spawn(JOB_MODULES=MODULES)
    assert r.blpop(["s3:started"], 20)
    assert r.get(lock_of(a)) is None and r.hget(K.job(a), "status") == "queued"  # running: the claim freed it
    b = uj.ustart.enqueue("s3", 1)
    assert b != a and queued(r) == 1 and r.get(lock_of(a)) == b
    assert uj.ustart.enqueue("s3", 1) == b and queued(r) == 1          # never two waiting
    r.rpush("s3:go", "first")
    assert get_job(a).wait(timeout=20).result == "first"
    assert r.blpop(["s3:started"], 20) and r.get(lock_of(a)) is None    # b runs: free again
    c = uj.ustart.enqueue("s3", 1)
    assert c not in (a, b) and queued(r) == 1
    r.rpush("s3:go", "second", "third")
    assert get_job(b).wait(timeout=20).result == "second" and get_job(c).wait(timeout=20).result == "third"
    w.signal(15)
    assert w.wait(15) == 0


@pytest.mark.timeout(60)
def test_unique_until_start_a_retry_takes_the_key_back(r, uj, spawn):
    a = uj.ustart_fail_once.enqueue("s4")
    w = spawn(JOB_MODULES=MODULES)
    assert r.blpop(["s4:started"], 20) and r.get(lock_of(a)) is None
    r.rpush("s4:go", "x")
    wait_until(lambda: get_job(a).status == "scheduled", 20, "its retry scheduled")
    assert r.get(lock_of(a)) == a and uj.ustart_fail_once.enqueue("s4") == a and queued(r) == 1
    assert r.blpop(["s4:started"], 20) == ("s4:started", "2") and r.get(lock_of(a)) is None  # the retry started
    r.rpush("s4:go", "x")
    assert get_job(a).wait(timeout=20).result == 2
    w.signal(15)
    assert w.wait(15) == 0


@pytest.mark.timeout(90)
def test_unique_until_start_put_back_takes_the_key_back_if_free_else_both_wait(r, uj, spawn):
    """A SIGTERM puts the running job back: with the key free it holds it again (equal enqueues return it); when an
    equal job queued while it ran, both wait (nothing dropped), the key stays with the newer, and a third equal
    enqueue adds nothing."""
    a = uj.ustart.enqueue("s5", 1)
    w = spawn(JOB_MODULES=MODULES)
    assert r.blpop(["s5:started"], 20)
    dyno.shutdown(w.pid, window=10)
    wait_until(lambda: r.llen(K.queue("default")) == 1, 20, "the job put back")
    assert r.get(lock_of(a)) == a and uj.ustart.enqueue("s5", 1) == a and queued(r) == 1
    w = spawn(JOB_MODULES=MODULES)
    assert r.blpop(["s5:started"], 20) and r.get(lock_of(a)) is None     # the put-back run started: free
    b = uj.ustart.enqueue("s5", 1)                                       # queued while a runs
    assert b != a
    dyno.shutdown(w.pid, window=10)
    wait_until(lambda: r.llen(K.queue("default")) == 2, 20, "a put back beside b")
    assert r.get(lock_of(a)) == b and uj.ustart.enqueue("s5", 1) == b and queued(r) == 2
    assert [json.loads(p)["id"] for p in r.lrange(K.queue("default"), 0, -1)] == [a, b]  # a first
    w = spawn(JOB_MODULES=MODULES)
    r.rpush("s5:go", "a", "b")
    assert get_job(a).wait(timeout=20).status == "done" and get_job(b).wait(timeout=20).status == "done"
    w.signal(15)
    assert w.wait(15) == 0


@pytest.mark.timeout(120)
def test_unique_until_start_sigkill_and_recovery_while_the_app_reenqueues(r, uj, spawn):
    """The dyno running the job is SIGKILLed; the app keeps enqueueing: the first enqueue after the start queues one
    equal job (the key was free) and every later one returns it; recovery puts the killed run back beside it
    (both wait: it does not take the key from a waiting job); each then runs once."""
    a = spawn(DYNO="worker.1", **FAST)
    first = uj.ustart.enqueue("s6", 1)
    assert r.blpop(["s6:started"], 20)
    second = uj.ustart.enqueue("s6", 1)
    a.kill_tree()
    b = spawn(DYNO="worker.2", QUEUES="elsewhere", **FAST)  # recovers, runs nothing of these
    ids = set()
    while r.llen(K.queue("default")) < 2:  # until the recovery puts the killed run back
        ids.add(uj.ustart.enqueue("s6", 1))
        assert queued(r) <= 2
        time.sleep(0.05)
    assert ids == {second} and second != first
    b.wait_for(rf"event=recovery\.requeued job={first}")
    assert [json.loads(p)["id"] for p in r.lrange(K.queue("default"), 0, -1)] == [first, second]
    assert r.get(lock_of(first)) == second and uj.ustart.enqueue("s6", 1) == second
    c = spawn(DYNO="worker.3", **FAST)
    r.rpush("s6:go", "x", "y")
    assert get_job(first).wait(timeout=20).status == "done" and get_job(second).wait(timeout=20).status == "done"
    for w in (b, c):
        w.signal(signal.SIGTERM)
        assert w.wait(15) == 0
    assert uj.ustart.enqueue("s6", 1) not in (first, second) and queued(r) == 1   # the key is free at the end


def test_inline_mode_honours_unique_until_start():
    import tests.jobs_unique as uj
    with testing.inline(run_scheduled=False) as ctx:
        a = uj.uquick_start.enqueue_in(60, 1)
        assert uj.uquick_start.enqueue_in(60, 1) == a and uj.uquick_start.enqueue(1) == a and len(ctx.jobs) == 1
        assert ctx.run_scheduled() == [a] and ctx.get(a)["result"] == 3
        b = uj.uquick_start.enqueue(1)
        assert b != a and ctx.get(b)["status"] == "done" and len(ctx.jobs) == 2


# --- chaos (issue 25 "Done when"): whole dynos SIGTERMed and SIGKILLed while the app keeps re-enqueueing ---

def _in_flight(r) -> dict:
    return {k: r.llen(k) for k in r.keys(K.processing("*")) if r.llen(k)}


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", [2511, 2512])
def test_chaos_unique_jobs_are_never_lost_and_never_run_twice_at_once(r, uj, spawn, seed):
    """Three dynos of two slots, each SIGKILLed (a crash) or SIGTERMed (Heroku: every process; foreman: the worker
    only) on a seeded random schedule and restarted at once, while the app enqueues 12 unique keys over and over,
    and 4 keys of unique_until="start". Each run of a (default) key checks, as it starts, that no earlier run of that
    key is still running (``uchaos``: an open run whose process lives): never two at once. Nothing is lost: every
    enqueue returned the key's one id (unique_until="start": one of the ids it returned), and in the end every id
    returned is done, nothing is queued or claimed, and a last enqueue of each key runs once more (no key
    stranded)."""
    import os
    import random
    from worker.failed import FailedRegistry
    rng = random.Random(int(os.environ.get("CHAOS_SEED") or seed))
    env = dict(FAST, SHUTDOWN_WINDOW="4", WORKER_CONCURRENCY="2")
    keys = [(f"k{i}", 0.05 * (1 + i % 4)) for i in range(12)]
    ids = {k: uj.uchaos.enqueue(k, s) for k, s in keys}
    skeys = [(f"s{i}", 0.1 * (1 + i % 2)) for i in range(4)]
    sids = {uj.uchaos_start.enqueue(k, s) for k, s in skeys}
    dynos = [spawn(DYNO=f"worker.{i}", **env) for i in range(3)]
    kills = terms = enqueues = 0
    started = time.monotonic()
    while time.monotonic() - started < float(os.environ.get("CHAOS_SECONDS", "15")):
        until = time.monotonic() + rng.uniform(0.3, 1.0)  # the chaos schedule itself, not a synchronisation
        while time.monotonic() < until:
            k, s = rng.choice(keys)
            assert uj.uchaos.enqueue(k, s) == ids[k]
            if rng.random() < 0.25:
                k, s = rng.choice(skeys)
                sids.add(uj.uchaos_start.enqueue(k, s))
            enqueues += 1
            time.sleep(0.01)
        i = rng.randrange(3)
        action = rng.choice(["kill", "kill", "term_group", "term_parent"])
        try:
            if action == "kill":
                dynos[i].kill_tree()
                kills += 1
            else:
                (os.killpg if action == "term_group" else os.kill)(dynos[i].pid, signal.SIGTERM)
                terms += 1
        except ProcessLookupError:
            pass
        dynos[i] = spawn(DYNO=f"worker.{i}", **env)
    wait_until(lambda: all(r.hget(K.job(j), "status") == "done" for j in [*ids.values(), *sids])
               and queued(r) == 0 and _in_flight(r) == {}, 90, "every job done, nothing queued or claimed")
    runs = [json.loads(x) for x in r.lrange("uc:runs", 0, -1)]
    print(f"\nunique chaos: seed={seed} {enqueues} enqueues, {kills} SIGKILLs, {terms} SIGTERMs, {len(runs)} runs, "
          f"{len(sids)} unique_until='start' jobs")
    assert r.lrange("uc:overlaps", 0, -1) == [], f"seed {seed}: two runs of one key at once"
    assert set(FailedRegistry(jobs.default_broker()).ids()) == set(), f"seed {seed}"
    assert {x["key"] for x in runs} == {k for k, _ in keys + skeys}
    ends = r.llen("uc:ends")
    assert [uj.uchaos.enqueue(k, s) for k, s in keys] == [ids[k] for k, _ in keys]
    assert not sids & {uj.uchaos_start.enqueue(k, s) for k, s in skeys}
    wait_until(lambda: r.llen("uc:ends") == ends + len(keys) + len(skeys) and queued(r) == 0, 60,
               "the last enqueues' runs")
    assert r.lrange("uc:overlaps", 0, -1) == []
