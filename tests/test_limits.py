"""Global concurrency and rate limits per job (issue 25 items 2 and 3): ``@job(concurrency=N)`` and
``@job(rate="10/s")``, enforced in the claim (worker/lua/cycle.lua) across every worker and slot, on Redis's clock. A
limited job that cannot start now moves aside (``P:held:<name>``, or parked in ``P:scheduled`` until its token) so the
rest of its queue flows; every end of a run frees its slot, including a SIGTERM put-back and a SIGKILL recovery."""
import json
import time

import pytest

from tests import dyno
from tests.support import events, name_of, overlaps, url_of, wait_until
from worker import jobs
from worker.keys import Keys
from worker.results import get_job

MODULES = "worker.sample,tests.jobs,tests.jobs_limits"
K = Keys()
FAST = {"HEARTBEAT_INTERVAL": "0.5", "HEARTBEAT_TTL": "2", "JOB_MODULES": MODULES}


@pytest.fixture
def lj(r, module_broker):
    import tests.jobs_limits as lj
    module_broker(MODULES)
    return lj


def spans(evs, tags=None) -> list:
    """``[(start, end), ...]`` of the runs recorded in ``evs`` (only ``tags`` if given; an unfinished run: end inf)."""
    out, open_ = [], {}
    for e in evs:
        if tags is not None and e["tag"] not in tags:
            continue
        if e["event"] == "start":
            open_[(e["tag"], e["pid"])] = e["t"]
        elif e["event"] == "end":
            out.append((open_.pop((e["tag"], e["pid"])), e["t"]))
    return out + [(t, float("inf")) for t in open_.values()]


def finished(evs) -> list:
    return [s for s in spans(evs) if s[1] != float("inf")]


def most_at_once(runs) -> int:
    """The largest number of ``runs`` in flight at one instant (an end at t comes before a start at t)."""
    edges = sorted([(s, 1) for s, _ in runs] + [(e, -1) for _, e in runs], key=lambda x: (x[0], x[1]))
    most = now = 0
    for _, d in edges:
        now += d
        most = max(most, now)
    return most


def limit_keys_clean(r, name) -> bool:
    return r.hlen(K.running(name)) == 0 and r.llen(K.held(name)) == 0


def test_bad_declarations_are_refused_at_decoration():
    from worker import job
    for bad, exc in [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)]:
        with pytest.raises(exc, match="concurrency"):
            job(name=f"bad_conc_{bad!r}", concurrency=bad)(lambda: None)
    for bad, exc in [("10", ValueError), ("0/s", ValueError), ("10/d", ValueError), ("x/s", ValueError),
                     ("1.5/s", ValueError), ("-1/s", ValueError), (10, TypeError), ((10, "s"), TypeError)]:
        with pytest.raises(exc, match="rate"):
            job(name=f"bad_rate_{bad!r}", rate=bad)(lambda: None)
    assert jobs.limits(3, " 100 / m ") == (3, (100, 60000)) and jobs.limits(None, "7/h") == (None, (7, 3600000))
    import tests.jobs_limits  # noqa: F401
    meta = jobs.meta()
    assert meta["lim2"]["concurrency"] == 2 and meta["rated"]["rate"] == (5, 1000)
    assert meta["free"]["concurrency"] is None and meta["free"]["rate"] is None
    from worker import config, startup
    shown = startup.fields(config.from_mapping({"REDIS_URL": "redis://x"}), meta)["limits"]  # worker.start's line
    assert "both:1+2/s" in shown and "lim2:2" in shown and "rated:5/s" in shown and "free" not in shown


@pytest.mark.timeout(120)
def test_three_workers_of_four_slots_never_run_more_than_two_while_the_queue_flows(r, lj, spawn):
    """3 workers x 4 slots, concurrency=2: timestamps written by the jobs never show more than 2 runs at once, and
    the unlimited jobs queued behind the limited ones all ran while most limited ones still waited (no head-of-line
    blocking); at the end no run is counted and none is held."""
    limited = [f"l{i}" for i in range(12)]
    for tag in limited:
        lj.lim2.enqueue("lim:ev", tag, 0.4)
    for i in range(12):
        lj.free.enqueue("lim:ev", f"f{i}")
    for n in (1, 2, 3):
        spawn(DYNO=f"worker.{n}", WORKER_CONCURRENCY="4", **FAST)
    wait_until(lambda: sum(e["event"] == "end" for e in events(r, "lim:ev")) == 24, 60, "every job ended")
    evs = events(r, "lim:ev")
    runs = spans(evs, set(limited))
    assert len(runs) == 12 and overlaps(evs) == []
    assert most_at_once(runs) == 2, runs          # the limit, reached (12 slots were free)
    free_ends = [e["t"] for e in evs if e["event"] == "end" and e["tag"].startswith("f")]
    starts = sorted(s for s, _ in runs)
    assert max(free_ends) < starts[-1], "the unlimited jobs waited behind the limited ones"
    wait_until(lambda: limit_keys_clean(r, "lim2"), 10, "no run counted, none held")


@pytest.mark.timeout(120)
def test_a_sigterm_put_back_frees_the_slot(r, lj, spawn):
    """A Heroku-style stop puts the running job back: its slot is freed in the same call, the held job goes back to
    its queue too, and the next worker runs both, one at a time."""
    a_id = lj.lim1.enqueue("pb:ev", "a")
    w = spawn(DYNO="worker.1", WORKER_CONCURRENCY="2", **FAST)
    wait_until(lambda: len(events(r, "pb:ev")) == 1, 20, "a started")
    b_id = lj.lim1.enqueue("pb:ev", "b")
    wait_until(lambda: r.llen(K.held("lim1")) == 1, 20, "b held (a holds the only slot)")
    assert r.llen(K.queue("default")) == 0 and get_job(b_id).status == "queued"
    dyno.shutdown(w.pid, window=10)
    assert r.hlen(K.running("lim1")) == 0, "the put-back did not free the slot"
    assert sorted(json.loads(p)["id"] for p in r.lrange(K.queue("default"), 0, -1)) == sorted([a_id, b_id])
    assert r.llen(K.held("lim1")) == 0
    spawn(DYNO="worker.2", WORKER_CONCURRENCY="2", **FAST)
    wait_until(lambda: sum(e["event"] == "start" for e in events(r, "pb:ev")) == 2, 20, "one of them again")
    r.rpush("pb:ev:go", "x", "x")
    assert get_job(a_id).wait(timeout=20).status == "done" and get_job(b_id).wait(timeout=20).status == "done"
    evs = events(r, "pb:ev")
    assert most_at_once(finished(evs)) == 1, evs  # (the interrupted run ended before the put-back)
    wait_until(lambda: limit_keys_clean(r, "lim1"), 10, "no run counted, none held")


@pytest.mark.timeout(120)
def test_a_sigkill_recovery_frees_the_slot(r, lj, spawn):
    """A dyno SIGKILLed mid-run: the recovering worker frees the dead run's slot in the recovery script and the
    held job goes back to its queue; both jobs then run, one at a time; nothing stays counted or held."""
    a = spawn(DYNO="worker.1", WORKER_CONCURRENCY="2", **FAST)
    a_id = lj.lim1.enqueue("rk:ev", "a")
    wait_until(lambda: len(events(r, "rk:ev")) == 1, 20, "a started")
    b_id = lj.lim1.enqueue("rk:ev", "b")
    wait_until(lambda: r.llen(K.held("lim1")) == 1, 20, "b held")
    a.kill_tree()
    b = spawn(DYNO="worker.2", WORKER_CONCURRENCY="2", **FAST)
    b.wait_for(rf"event=recovery\.requeued job={a_id}", 30)
    wait_until(lambda: sum(e["event"] == "start" for e in events(r, "rk:ev")) == 2, 20, "a run again")
    assert r.hlen(K.running("lim1")) == 1          # the new run only: the dead one's entry went
    r.rpush("rk:ev:go", "x", "x")
    assert get_job(a_id).wait(timeout=20).status == "done" and get_job(b_id).wait(timeout=20).status == "done"
    evs = events(r, "rk:ev")
    assert most_at_once(finished(evs)) == 1, evs  # (the killed run never ended)
    wait_until(lambda: limit_keys_clean(r, "lim1"), 10, "no run counted, none held")


@pytest.mark.timeout(120)
def test_a_rate_limit_spaces_the_runs_and_the_queue_flows(r, lj, spawn):
    """rate="5/s" (a bucket of 5): 15 jobs on two workers of 4 slots take at least 2 s (5 at once, then one every
    200 ms on Redis's clock), never more than 5 start in any 200 ms... and unlimited jobs queued behind them all run
    before the rated ones are through."""
    for i in range(15):
        lj.rated.enqueue("rt:ev", f"r{i}")
    for i in range(5):
        lj.free.enqueue("rt:ev", f"f{i}")
    for n in (1, 2):
        spawn(DYNO=f"worker.{n}", WORKER_CONCURRENCY="4", **FAST)
    wait_until(lambda: sum(e["event"] == "start" for e in events(r, "rt:ev")) == 20, 60, "every job ran")
    evs = events(r, "rt:ev")
    starts = sorted(e["t"] for e in evs if e["event"] == "start" and e["tag"].startswith("r"))
    assert starts[-1] - starts[0] >= 1.8, starts   # 10 tokens after the burst of 5: 2 s (minus the clocks' slack)
    for i in range(5, 15):  # after the burst, one token every 200 ms
        assert starts[i] - starts[0] >= (i - 4) * 0.2 - 0.1, (i, starts)
    free_starts = [e["t"] for e in evs if e["event"] == "start" and e["tag"].startswith("f")]
    assert max(free_starts) < starts[-1], "the unlimited jobs waited behind the rated ones"
    assert r.zcard(K.scheduled) == 0


@pytest.mark.timeout(90)
def test_a_held_job_shows_as_queued_and_can_be_canceled(r, lj, spawn):
    from worker import cancel
    a_id = lj.lim1.enqueue("cx:ev", "a")
    w = spawn(DYNO="worker.1", WORKER_CONCURRENCY="2", **FAST)
    wait_until(lambda: len(events(r, "cx:ev")) == 1, 20, "a started")
    b_id = lj.lim1.enqueue("cx:ev", "b")
    c_id = lj.lim1.enqueue("cx:ev", "c")
    wait_until(lambda: r.llen(K.held("lim1")) == 2, 20, "b and c held")
    assert get_job(b_id).status == "queued" and get_job(c_id).status == "queued"
    from worker.api import API
    from worker.config import from_mapping
    view = API(r, from_mapping({"REDIS_URL": url_of(r)})).job(c_id)  # the dashboard's job page
    assert view["status"] == "queued" and view["args"] == ["cx:ev", "c"]
    assert cancel(b_id) is True and get_job(b_id).status == "canceled"
    assert r.llen(K.held("lim1")) == 1
    r.rpush("cx:ev:go", "x", "x")
    assert get_job(a_id).wait(timeout=20).status == "done" and get_job(c_id).wait(timeout=20).status == "done"
    assert [e["tag"] for e in events(r, "cx:ev") if e["event"] == "start"] == ["a", "c"]
    w.signal(15)
    assert w.wait(15) == 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("which", ["running", "held", "rate"])
def test_a_wrong_typed_limit_key_loses_no_job_and_names_the_key(r, lj, spawn, which):
    """A limit key of the wrong type (another program's string): the claim puts the limited job back at the head of
    its queue (no abort after the first write, no job lost), names the key (redis.wrong_type), and the worker goes
    on; once the key is cleared the job runs."""
    name = "both" if which == "rate" else "lim1"
    if which == "held":  # the held list is only written once the limit is reached
        r.hset(K.running(name), "0:someone-alive", "x")
        r.zadd(K.workers, {"someone-alive": 1e15})
    key = {"running": K.running, "held": K.held, "rate": K.rate}[which](name)
    r.set(key, "junk")
    job_id = (lj.both if name == "both" else lj.lim1).enqueue("wt:ev", "a")
    w = spawn(DYNO="worker.1", **FAST)
    w.wait_for(rf"event=redis.wrong_type key={key} type=string", 20)
    assert [json.loads(p)["id"] for p in r.lrange(K.queue("default"), 0, -1)] == [job_id]
    assert r.llen(K.processing(name_of(w))) == 0
    r.delete(key, K.running(name))
    r.rpush("wt:ev:go", "x")
    assert get_job(job_id).wait(timeout=20).status == "done"
    assert w.popen.poll() is None


@pytest.mark.timeout(60)
def test_held_jobs_go_back_when_a_deploy_removes_or_raises_the_limit(r, lj, spawn):
    """Jobs held under an older deploy's limit that no end of a run would release any more: the job lost its limit
    (``free`` has none now) or the limit has room (``lim2``, nothing running): the worker's recovery pass (at start,
    then every 2 x HEARTBEAT_INTERVAL) puts them back on their queues, and they run."""
    from worker.payload import build_payload
    ids = []
    for name, tag in (("free", "was-limited"), ("lim2", "room-now")):
        job_id, _, payload = build_payload(name, ["dp:ev", tag], {}, "default", 1 << 20)
        r.rpush(K.held(name), "default\n" + payload)
        r.hset(K.job(job_id), mapping={"status": "queued", "name": name, "queue": "default"})
        ids.append(job_id)
    spawn(DYNO="worker.1", **FAST)
    for job_id in ids:
        assert get_job(job_id).wait(timeout=20).status == "done"
    assert r.llen(K.held("free")) == 0 and limit_keys_clean(r, "lim2")


@pytest.mark.timeout(90)
def test_a_failed_attempt_and_a_running_cancel_free_the_slot(r, lj, spawn):
    """The outcome of a failed attempt (scheduled for a retry) frees the slot at once: the held job runs while the
    retry waits; a running job canceled (running=True) frees it too."""
    from worker import cancel
    w = spawn(DYNO="worker.1", WORKER_CONCURRENCY="2", **FAST)
    a_id = lj.lim1_flaky.enqueue("fr:ev", "a")
    b_id = lj.lim1.enqueue("fr:ev", "b")  # another name: runs beside
    c_id = lj.lim1_flaky.enqueue("fr:ev", "c")
    wait_until(lambda: get_job(a_id).status == "scheduled", 20, "a's retry scheduled")
    wait_until(lambda: [e["tag"] for e in events(r, "fr:ev") if e["event"] == "start"].count("c") == 1, 20,
               "c ran once a's failed attempt freed the slot")
    assert cancel(b_id, running=True) is not False
    assert get_job(b_id).wait(timeout=20).status == "canceled"
    assert r.hlen(K.running("lim1")) == 0
    r.rpush("fr:ev:go", "x", "x", "x")
    assert get_job(a_id).wait(timeout=30).status == "done" and get_job(c_id).wait(timeout=30).status == "done"
    assert most_at_once(finished([e for e in events(r, "fr:ev") if e["tag"] != "b"])) == 1
    wait_until(lambda: limit_keys_clean(r, "lim1_flaky") and limit_keys_clean(r, "lim1"), 10, "nothing counted")
    w.signal(15)
    assert w.wait(15) == 0


@pytest.mark.timeout(60)
def test_held_jobs_go_back_when_the_runs_counted_belong_to_workers_gone(r, lj, spawn):
    """Runs counted for workers no longer registered (their entries outlived them: a claim whose reply was lost, a
    worker hash that could not be read) and held jobs with no run left to end: the recovery pass drops those
    entries and puts the held jobs back; nothing waits for a claim of that name that would never come."""
    from worker.payload import build_payload
    r.hset(K.running("lim2"), mapping={"0:gone-1": "x", "1:gone-2": "y"})
    job_id, _, payload = build_payload("lim2", ["gw:ev", "held"], {}, "default", 1 << 20)
    r.rpush(K.held("lim2"), "default\n" + payload)
    r.hset(K.job(job_id), mapping={"status": "queued", "name": "lim2", "queue": "default"})
    spawn(DYNO="worker.1", **FAST)
    assert get_job(job_id).wait(timeout=20).status == "done"
    assert limit_keys_clean(r, "lim2")


@pytest.mark.timeout(60)
def test_a_wrong_typed_limit_key_does_not_stall_the_rest_of_the_queue(r, lj, spawn):
    """Adversarial review of issue 25: a limited job whose limit key is of the wrong type went back to the head of
    its queue and ended the call's claims from it, so every later call took it again: the jobs behind it (limited
    or not) never ran while the stray key lasted, against "a job held back by its limit does not block other jobs in
    the same queue". Now it steps aside (to the tail) and the queue flows; it waits, at the head again once the
    rest is taken, named (redis.wrong_type), and runs once the key is cleared. No spin: the worker stays idle."""
    r.set(K.running("lim1"), "junk")
    stuck = lj.lim1.enqueue("ws:ev", "a")
    others = [lj.free.enqueue("ws:ev", f"f{i}") for i in range(3)]
    w = spawn(DYNO="worker.1", WORKER_CONCURRENCY="2", **FAST)
    w.wait_for(rf"event=redis.wrong_type key={K.running('lim1')} type=string", 20)
    for i in others:
        assert get_job(i).wait(timeout=20).status == "done"
    wait_until(lambda: r.lrange(K.queue("default"), 0, -1) and
               [json.loads(p)["id"] for p in r.lrange(K.queue("default"), 0, -1)] == [stuck], 10, "it waits")
    r.delete(K.running("lim1"))
    r.rpush("ws:ev:go", "x")
    lj.free.enqueue("ws:ev", "kick")  # a wake-up (the key's repair rings nothing)
    assert get_job(stuck).wait(timeout=20).status == "done"
    assert w.popen.poll() is None
    w.signal(15)
    assert w.wait(15) == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tat", ["inf", "nan", "1e300", "-inf"])
def test_a_hostile_rate_state_is_reset_and_aborts_nothing(r, lj, spawn, tat):
    """Adversarial review of issue 25: P:rate:<name>'s tat read as a number Lua accepts but Redis does not as an
    integer (inf, nan, 1e300: another program's or a corrupted value) made the claim raise after its first writes
    (the job parked in P:scheduled at +inf and still in the processing list, or neither run nor recorded). Now a tat
    that is not a finite time within a year of now counts as none: the job runs, once, and the worker goes on."""
    r.hset(K.rate("rated"), "tat", tat)
    ids = [lj.rated.enqueue("hr:ev", f"r{i}") for i in range(2)] + [lj.free.enqueue("hr:ev", "f")]
    w = spawn(DYNO="worker.1", **FAST)
    for i in ids:
        assert get_job(i).wait(timeout=20).status == "done"
    assert r.zcard(K.scheduled) == 0 and r.llen(K.processing(name_of(w))) == 0
    assert sorted(e["tag"] for e in events(r, "hr:ev") if e["event"] == "start") == ["f", "r0", "r1"]
    assert float(r.hget(K.rate("rated"), "tat")) < time.time() * 1000 + 60_000
    w.signal(15)
    assert w.wait(15) == 0
