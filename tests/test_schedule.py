"""Periodic jobs (worker/schedule.py, lua.SCHEDULE) on a real redis-server with real workers: each tick enqueued
exactly once by however many workers, through crashes; a missed tick once on restart; pause; status; config errors.

The scheduled test jobs (tests/jobs_schedule.py) go to queues no test worker consumes (QUEUES=default), so a queue's
entries are exactly the enqueues, each carrying its ``tick``."""
import json
import signal
import sys
import time
from collections import Counter

import pytest

from tests.support import keys_of, make_broker, wait_until
from worker import jobs, schedule
from worker.config import ConfigError

pytestmark = pytest.mark.both_backends  # each test that uses Redis on the single redis-server and the local cluster

MODS = "tests.jobs_schedule"


def ticks(r, queue):
    return [json.loads(p)["tick"] for p in r.lrange(keys_of(r).queue(queue), 0, -1)]


# --- parsing and ticks (no Redis) ---

def test_every_and_cron_ticks_on_the_given_clock():
    s = schedule.build("j", "q", schedule.declare(300, None, None, None, None, None))
    assert s.ticks(1_000_000_123) == (999_900_000, 1_000_200_000) and s.grace(*s.ticks(1_000_000_123)) == 300_000
    c = schedule.build("j", "q", schedule.declare(None, "*/5 * * * *", None, 30, ["a"], {"b": 1}))
    t = 1_700_000_000_000  # 2023-11-14T22:13:20Z
    assert c.ticks(t) == (1_699_999_800_000, 1_700_000_100_000) and c.grace(0, 1) == 30_000
    assert c.ticks(1_699_999_800_000)[0] == 1_699_999_800_000  # a tick is its own latest tick
    paris = schedule.build("j", "q", schedule.declare(None, "0 9 * * *", "Europe/Paris", None, None, None))
    assert paris.ticks(t) == (1_699_948_800_000, 1_700_035_200_000)  # 09:00 in Paris = 08:00 UTC in November
    assert paris.spec == "cron 0 9 * * * Europe/Paris"


@pytest.mark.parametrize("sched, words", [
    ((None, "61 * * * *", None, None, None, None), "cron='61 * * * *' is not valid: Bad minute"),
    ((None, "0 * * * * *", None, None, None, None), "expected 5 fields"),
    ((None, "* * * * *", "Mars/Olympus", None, None, None), "not a known time zone"),
    ((0.5, None, None, None, None, None), "every=0.5 is not valid"),
    ((60, None, None, -1, None, None), "misfire_grace=-1 is not valid"),
])
def test_bad_schedules_are_one_line_config_errors(sched, words):
    with pytest.raises(ConfigError) as err:
        schedule.build("j", "q", schedule.declare(*sched))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_cron_without_cronsim_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "cronsim", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"pip install cronsim"):
        schedule.build("j", "q", schedule.declare(None, "* * * * *", None, None, None, None))
    schedule.build("j", "q", schedule.declare(60, None, None, None, None, None))  # every= needs no library


def test_decorator_refuses_ambiguous_schedules_and_meta_checks_arguments():
    with pytest.raises(ValueError, match="not both"):
        jobs.job(every=60, cron="* * * * *", name="t_both")(lambda: None)
    with pytest.raises(ValueError, match="need every= or cron="):
        jobs.job(schedule_args=[1], name="t_args")(lambda: None)
    spec = jobs.JobSpec("t_bind", lambda a: None, "q", None, None, jobs.inspect.signature(lambda a: None),
                        schedule=schedule.declare(60, None, None, None, [], {"b": 1}))
    with pytest.raises(ConfigError, match="do not fit"):
        schedule.check(spec)


# --- the claim script ---

class Log:
    def __init__(self):
        self.lines = []

    def info(self, event, **f):
        self.lines.append((event, f))
    error = warning = debug = info


def test_claim_script_enqueues_each_tick_once_and_refuses_skew_late_and_paused(r, k):
    broker = make_broker(r)
    s = schedule.build("every_hour", "hq", schedule.declare(3600, None, None, None, ["x"], None))
    run = broker.r.register_script(__import__("worker.lua", fromlist=["SCHEDULE"]).SCHEDULE)
    now = int(r.time()[0]) * 1000

    def claim(tick, nxt, grace=3_600_000, name="every_hour"):
        job_id, payload = s.payload(tick)
        return run(keys=[k.paused, k.queues, k.schedules],
                   args=[k.prefix, name, "hq", tick, nxt, grace, 10_000_000, s.spec, payload, job_id, ""])[1]

    last, nxt = s.ticks(now)
    assert claim(last + 3_600_000, nxt + 3_600_000) == "skew" and claim(last - 3_600_000, last) == "skew"
    assert [claim(last, nxt) for _ in range(3)] == ["enqueued", "taken", "taken"]
    assert ticks(r, "hq") == [last / 1000] and r.sismember(k.queues, "hq") and r.llen(k.wake("hq")) == 1
    assert claim(last, nxt, grace=0, name="late_one") in ("late", "enqueued")  # "enqueued" only within the same ms
    r.sadd(k.paused, "hq")
    assert claim(last, nxt, name="paused_one") == "paused" and claim(last, nxt, name="paused_one") == "taken"
    assert r.llen(k.queue("hq")) <= 2 and r.pttl(k.sched("every_hour")) > 0
    assert r.hget(k.sched("paused_one"), "reason") == "paused"


def test_claim_script_skips_a_tick_while_the_previous_run_has_not_ended(r, k):
    """Unique per schedule (issue 25): the tick's run gets a status record; the next tick is skipped
    ('overlap:<id>') while that record says queued (also while it runs) or scheduled (a retry), and enqueued once it
    says done, failed or canceled, or is gone (RESULT_TTL 0). @job(unique=False) ('') skips nothing."""
    from worker import lua
    from worker.lua import calls
    s = schedule.build("uh", "uq", schedule.declare(3600, None, None, None, None, None))
    assert s.unique and not schedule.build("o", "q", schedule.declare(1, None, None, None, None, None, False)).unique
    now = int(r.time()[0]) * 1000
    tick = iter(range(now - 100_000, now, 1000))

    def claim(unique=True):
        t = next(tick)
        job_id, payload = s.payload(t)
        row = ("uh", "uq", t, now + 60_000, 3_600_000, 10_000, s.spec, payload, job_id, "1" if unique else "")
        return lua.Registry(r).run(calls.schedule(k, [row]))[1], job_id

    code, first = claim()
    assert code == "enqueued" and r.hget(k.job(first), "status") == "queued" and r.hget(k.sched("uh"), "run") == first
    assert r.hgetall(k.job(first))["name"] == "uh" and r.pttl(k.sched("uh")) == -1  # no expiry while it is pending
    assert claim()[0] == f"overlap:{first}" and r.hget(k.sched("uh"), "reason") == "overlap"
    r.hset(k.job(first), "status", "scheduled")  # waiting for a retry
    assert claim()[0] == f"overlap:{first}" and r.llen(k.queue("uq")) == 1
    code, other = claim(unique=False)
    assert code == "enqueued" and r.llen(k.queue("uq")) == 2 and r.pttl(k.sched("uh")) > 0
    for end in ("done", "failed", "canceled", None):
        if end:
            r.hset(k.job(other), "status", end)
        else:
            r.delete(k.job(other))
        code, other = claim()
        assert code == "enqueued", end
        assert claim()[0] == f"overlap:{other}"


# --- real workers ---

@pytest.mark.timeout(90)
def test_three_workers_enqueue_each_of_ten_ticks_once_through_sigkills(r, k, spawn):
    workers = [spawn(JOB_MODULES=MODS) for _ in range(3)]
    wait_until(lambda: r.llen(k.queue("sched")) >= 1, 20, "the first tick")
    t0 = ticks(r, "sched")[0]
    for n, victim in ((3, 0), (6, 1)):  # SIGKILL a whole worker tree mid-run, then start it again
        wait_until(lambda: max(ticks(r, "sched")) >= t0 + n, 20, f"tick {n}")
        workers[victim].kill_tree()
        workers[victim] = spawn(JOB_MODULES=MODS)
    wait_until(lambda: max(ticks(r, "sched")) >= t0 + 10, 30, "ten ticks")
    seen = Counter(ticks(r, "sched"))
    assert [t for t, c in seen.items() if c > 1] == [], "a tick was enqueued twice"
    assert sorted(t for t in seen if t < t0 + 10) == [t0 + i for i in range(10)], "a tick was missed"
    enqueued = [line for w in workers for line in w.output.splitlines()
                if "event=schedule.enqueued schedule=every_second" in line]
    assert len({line.split("tick=")[1].split()[0] for line in enqueued}) == len(enqueued)


@pytest.mark.timeout(60)
def test_a_tick_missed_while_all_workers_were_down_is_enqueued_once_on_restart(r, k, spawn, cli):
    now = int(r.time()[0])
    latest = now // 3600 * 3600
    if now - latest < 3:
        pytest.skip("too close to the hour for the 1 s misfire_grace case")
    # The last tick enqueued before every worker went away was the previous hour's.
    r.hset(k.sched("hourly"), mapping={"tick": (latest - 3600) * 1000, "last": (latest - 3600) * 1000})
    workers = [spawn(JOB_MODULES=MODS) for _ in range(3)]
    for w in workers:
        w.wait_for("event=worker.start", 20)
    wait_until(lambda: r.hget(k.sched("hourly_strict"), "reason") == "late", 10, "the strict schedule's skip")
    assert ticks(r, "hourly") == [latest], "one catch-up, the latest tick, not a burst"
    assert ticks(r, "strict") == [], "older than misfire_grace: skipped"
    for w in workers:
        w.kill_tree()
    w = spawn(JOB_MODULES=MODS)
    w.wait_for("event=worker.start", 20)
    w.wait_for("event=schedule.enqueued schedule=every_second", 10)  # it has checked every schedule since
    assert ticks(r, "hourly") == [latest], "the tick was already enqueued: not again"


@pytest.mark.timeout(60)
def test_pause_stops_the_enqueues_and_status_shows_last_and_next_tick(r, k, spawn, cli):
    w = spawn(JOB_MODULES=MODS)
    wait_until(lambda: r.llen(k.queue("sched")) >= 2, 20, "two ticks")
    assert cli("pause", "--queue", "sched").returncode == 0
    n = w.output.count("event=schedule.skipped schedule=every_second")
    wait_until(lambda: w.output.count("event=schedule.skipped schedule=every_second") >= n + 1, 10, "a paused tick")
    before = r.llen(k.queue("sched"))
    wait_until(lambda: w.output.count("reason=paused") >= n + 3, 10, "three paused ticks")
    assert r.llen(k.queue("sched")) == before, "a paused queue's schedule still enqueued"

    res = cli("status", "--json")
    assert res.returncode == 0, res.stderr
    doc = {s["name"]: s for s in json.loads(res.stdout)["schedules"]}
    assert set(doc) == {"every_second", "hourly", "hourly_strict", "minutely"}
    es = doc["every_second"]
    assert es["queue"] == "sched" and es["spec"] == "every 1s" and es["skip_reason"] == "paused"
    assert es["last"] == max(ticks(r, "sched")) and es["skipped"] > es["last"] and es["next"] > es["skipped"]
    assert doc["minutely"]["spec"] == "cron * * * * * UTC" and doc["minutely"]["next"] % 60 == 0
    human = cli("status").stdout
    row = next(line for line in human.splitlines() if line.startswith("every_second"))
    assert row.split()[1] == "sched" and row.split()[4] == "yes" and "LAST_UTC" in human and "NEXT_UTC" in human

    assert cli("resume", "--queue", "sched").returncode == 0
    wait_until(lambda: r.llen(k.queue("sched")) > before, 10, "enqueues after resume")


@pytest.mark.timeout(30)
def test_a_bad_cron_string_stops_the_worker_at_start_with_one_line(cli, r):
    res = cli("run", JOB_MODULES="tests.jobs_schedule_bad")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip() == "error: config: job 'never': cron='61 * * * *' is not valid: Bad minute"



@pytest.mark.timeout(60)
def test_a_stopping_worker_enqueues_no_more_ticks_and_exits_in_time(r, spawn, cli):
    w = spawn(JOB_MODULES="tests.jobs," + MODS)
    w.wait_for("event=schedule.enqueued", 20)
    assert cli("enqueue", "term_probe", "--args", '["probe", 60, 2.0]').returncode == 0
    assert json.loads(r.blpop("probe", 20)[1])["event"] == "started"
    w.signal(signal.SIGTERM)
    assert [json.loads(r.blpop("probe", 10)[1])["event"] for _ in range(2)] == ["term", "cleaned"]
    assert w.wait(15) == 0
    assert "event=schedule.enqueued" not in w.output.split("event=shutdown.signal", 1)[1]


# --- unique per schedule (issue 25 item 1): a tick is skipped while the previous tick's run has not ended ---

UMODS = "tests.jobs_schedule_unique"
UFAST = {"JOB_MODULES": UMODS, "HEARTBEAT_INTERVAL": "0.5", "HEARTBEAT_TTL": "2"}


def _spans(r, name):
    runs = [json.loads(x) for x in r.lrange(name + ":runs", 0, -1)]
    ends = [json.loads(x) for x in r.lrange(name + ":ends", 0, -1)]
    return runs, ends


def _overlap_skips(w, name):
    """The ids named by the worker's ``schedule.skipped ... reason=overlap previous=<id>`` lines for ``name``."""
    return [line.split("previous=")[1].split()[0] for line in w.output.splitlines()
            if f"event=schedule.skipped schedule={name}" in line and "reason=overlap" in line]


@pytest.mark.timeout(90)
def test_a_slow_periodic_job_skips_its_ticks_instead_of_piling_them_up(r, k, spawn):
    """The failure mode: an every-second job that runs for several seconds piled up a tick per second in its queue
    (and with several slots, ran them side by side). Now each tick is skipped while the previous run is running, with
    a log line naming it; once it is done the next tick runs; the runs never overlap."""
    w = spawn(QUEUES="slow", WORKER_CONCURRENCY="3", **UFAST)
    wait_until(lambda: r.llen("slow_tick:runs") == 1, 20, "the first run")
    first = r.hget(k.sched("slow_tick"), "run")
    assert r.hget(k.job(first), "status") == "queued"  # running: the claim writes no record
    wait_until(lambda: len(_overlap_skips(w, "slow_tick")) >= 3, 20, "three skipped ticks")
    assert set(_overlap_skips(w, "slow_tick")) == {first}
    assert r.llen(k.queue("slow")) == 0 and r.llen("slow_tick:runs") == 1, "a tick piled up behind the running one"
    assert r.hget(k.sched("slow_tick"), "reason") == "overlap" and r.pttl(k.sched("slow_tick")) == -1
    r.rpush("slow_tick:go", "1")
    wait_until(lambda: r.llen("slow_tick:runs") == 2, 20, "the next tick's run, once the first is done")
    second = r.hget(k.sched("slow_tick"), "run")
    assert second != first and r.hget(k.job(first), "status") == "done"
    r.rpush("slow_tick:go", "1")
    wait_until(lambda: r.llen("slow_tick:ends") == 2, 20, "the second run's end")
    runs, ends = _spans(r, "slow_tick")
    assert runs[1]["start"] >= ends[0]["end"], "two runs of one schedule at once"
    w.signal(signal.SIGTERM)
    assert w.wait(15) == 0


@pytest.mark.timeout(90)
def test_opting_out_with_unique_false_lets_ticks_overlap(r, spawn):
    w = spawn(QUEUES="overlap", WORKER_CONCURRENCY="3", **UFAST)
    wait_until(lambda: r.llen("overlapping_tick:ends") >= 1 and r.llen("overlapping_tick:runs") >= 3, 20,
               "overlapping runs")
    runs, ends = _spans(r, "overlapping_tick")
    assert runs[1]["start"] < ends[0]["end"], "the second tick waited for the first run"
    assert _overlap_skips(w, "overlapping_tick") == []
    w.signal(signal.SIGTERM)
    assert w.wait(15) == 0


@pytest.mark.timeout(120)
def test_a_put_back_and_a_recovered_run_keep_their_schedule_skipping(r, k, spawn):
    """The previous run put back by a SIGTERM, then SIGKILLed with its worker and recovered: queued again each time,
    so the ticks that fall meanwhile (made by a worker that does not consume its queue) are skipped, naming it; it
    runs once more, and only once it is done does a new tick's run start."""
    from tests import dyno
    ticker = spawn(QUEUES="elsewhere", **UFAST)  # ticks, never runs slow_tick, recovers the dead
    a = spawn(QUEUES="slow", **UFAST)
    wait_until(lambda: r.llen("slow_tick:runs") == 1, 20, "the first run")
    run = r.hget(k.sched("slow_tick"), "run")
    dyno.shutdown(a.pid, window=10)  # Heroku-style stop: put back at the head of its queue
    wait_until(lambda: r.llen(k.queue("slow")) == 1, 20, "the run put back")
    n = len(_overlap_skips(ticker, "slow_tick"))
    wait_until(lambda: len(_overlap_skips(ticker, "slow_tick")) >= n + 2, 20, "ticks skipped after the put-back")
    assert r.llen(k.queue("slow")) == 1 and set(_overlap_skips(ticker, "slow_tick")) == {run}
    b = spawn(QUEUES="slow", **UFAST)
    wait_until(lambda: r.llen("slow_tick:runs") == 2, 20, "the put-back run again")
    b.kill_tree()  # a dyno crash mid-run: the run stays in b's processing list until the ticker recovers it
    ticker.wait_for(rf"event=recovery\.requeued job={run}", 30)
    n = len(_overlap_skips(ticker, "slow_tick"))
    wait_until(lambda: len(_overlap_skips(ticker, "slow_tick")) >= n + 2, 20, "ticks skipped after the recovery")
    assert r.llen(k.queue("slow")) == 1 and set(_overlap_skips(ticker, "slow_tick")) == {run}
    c = spawn(QUEUES="slow", **UFAST)
    wait_until(lambda: r.llen("slow_tick:runs") == 3, 20, "the recovered run")
    r.rpush("slow_tick:go", "1")
    wait_until(lambda: r.llen("slow_tick:runs") == 4, 20, "a new tick's run, once the recovered one is done")
    assert r.hget(k.job(run), "status") == "done" and r.hget(k.sched("slow_tick"), "run") != run
    r.rpush("slow_tick:go", "1")
    wait_until(lambda: r.llen("slow_tick:ends") == 2, 20, "its end")
    runs, ends = _spans(r, "slow_tick")
    assert runs[3]["start"] >= ends[0]["end"]  # (ends[0]: the recovered run's; the killed ones never ended)
    for p in (c, ticker):
        p.signal(signal.SIGTERM)
        assert p.wait(15) == 0


def test_claim_script_a_wrong_typed_schedule_record_blocks_no_other_schedule(r, k):
    """Adversarial review of issue 25: one schedule's record P:sched:<name> of the wrong type (or P:queues) made
    the claim script raise after the schedules before it had been enqueued and recorded, and every later schedule
    never ran again. Now that schedule gets an error code (logged), the others are enqueued, nothing raises. A tick
    field of inf or nan (no clock reaches it) no longer marks every later tick taken."""
    from worker import lua
    from worker.lua import calls
    s = schedule.build("wa", "wq", schedule.declare(3600, None, None, None, None, None))
    now = int(r.time()[0]) * 1000

    def row(name, t):
        job_id, payload = s.payload(t)
        return (name, "wq", t, now + 60_000, 3_600_000, 10_000, s.spec, payload, job_id.replace("wa", name), "1")

    r.set(k.sched("wb"), "x")
    res = lua.Registry(r).run(calls.schedule(k, [row("wa", now - 1000), row("wb", now - 1000), row("wc", now - 1000)]))
    assert res[1] == "enqueued" and res[3] == "enqueued" and "WRONGTYPE" in res[2].upper(), res
    assert r.llen(k.queue("wq")) == 2 and r.get(k.sched("wb")) == "x"
    r.delete(k.sched("wb"))
    r.set(k.queues, "x")  # P:queues wrong-typed: the job is queued all the same, the schedule recorded
    res = lua.Registry(r).run(calls.schedule(k, [row("wd", now - 1000)]))
    assert res[1] == "enqueued" and r.llen(k.queue("wq")) == 3 and r.hget(k.sched("wd"), "run")
    r.delete(k.queues)
    for bad in ("inf", "nan"):  # a tick no clock reaches: every later tick was 'taken', the schedule dead for good
        r.hset(k.sched("we"), "tick", bad)
        assert lua.Registry(r).run(calls.schedule(k, [row("we", now - 1000)]))[1] == "enqueued"
        r.delete(k.sched("we"))
