"""cancel(job_id) (issue 24 item 2): a queued or scheduled job (or its retry) is taken out and never runs, status
canceled; atomic with the claim (a job canceled while a worker claims it runs at most once: canceled or done, never
both, never lost); the CLI; inline mode."""
import pytest

from tests.support import wait_until
from worker import cancel, jobs, testing
from worker.keys import Keys
from worker.results import get_job

MODULES = "worker.sample,tests.jobs,tests.jobs_control"
K = Keys()


@pytest.fixture
def api(r, module_broker):
    import tests.jobs_control  # noqa: F401  (registers the jobs here too, with their queues)
    return module_broker(MODULES)


@pytest.mark.timeout(30)
def test_a_queued_job_is_taken_out_and_marked_canceled(r, api):
    keep = jobs.enqueue("quick", "c1", "keep")
    gone = jobs.enqueue("quick", "c1", "gone")
    assert cancel(gone) is True
    assert get_job(gone).status == "canceled" and get_job(gone).ended_at
    assert [p.startswith('{"id":"' + keep) for p in r.lrange(K.queue("default"), 0, -1)] == [True]
    assert 0 < r.pttl(K.job(gone))
    assert cancel(gone) is False  # canceled already
    assert cancel("no-such-job") is False
    assert get_job(gone).wait(timeout=1).status == "canceled"


@pytest.mark.timeout(30)
def test_a_scheduled_job_is_taken_out_of_the_schedule(r, api):
    later = jobs.enqueue_in(3600, "quick", "c2")
    assert r.zcard(K.scheduled) == 1
    assert cancel(later) is True
    assert r.zcard(K.scheduled) == 0 and get_job(later).status == "canceled"


@pytest.mark.timeout(60)
def test_a_pending_retry_is_canceled_and_an_ended_job_is_not(r, api, spawn):
    job_id = jobs.enqueue("fail_often", "c3")
    done = jobs.enqueue("quick", "c3done")
    spawn(JOB_MODULES=MODULES)
    assert r.blpop(["c3"], 20)
    wait_until(lambda: get_job(job_id).status == "scheduled", 20, "its retry scheduled")
    assert cancel(job_id) is True
    assert r.zcard(K.scheduled) == 0 and get_job(job_id).status == "canceled"
    get_job(done).wait(timeout=20)
    assert cancel(done) is False and get_job(done).status == "done"


@pytest.mark.timeout(120)
def test_cancel_racing_the_claim_runs_each_job_at_most_once_and_loses_none(r, api, spawn):
    """Jobs canceled while a worker claims them as fast as it can: each one either was canceled (never ran) or
    ran and is done (cancel said False). Never both, never neither."""
    n = 300
    ids = [jobs.enqueue("quick", "c4", str(i)) for i in range(n)]
    spawn(JOB_MODULES=MODULES, WORKER_CONCURRENCY="2")
    wait_until(lambda: r.llen("c4") > 0, 20, "the worker started")
    said = [cancel(job_id) for job_id in ids]
    assert any(said), "the worker won every race: nothing was raced"
    last = jobs.enqueue("quick", "c4end", "x")
    get_job(last).wait(timeout=60)
    ran = set(r.lrange("c4", 0, -1))
    assert len(ran) == r.llen("c4")  # none twice
    for i, (job_id, canceled) in enumerate(zip(ids, said)):
        status = get_job(job_id).status
        if canceled:
            assert str(i) not in ran and status == "canceled", (i, status)
        else:
            assert str(i) in ran and status == "done", (i, status)
    assert r.llen(K.queue("default")) == 0


@pytest.mark.timeout(30)
def test_the_cli_exits_0_when_canceled_and_1_with_a_reason(r, api, cli):
    job_id = jobs.enqueue("quick", "c5")
    ok = cli("cancel", job_id)
    assert ok.returncode == 0 and job_id in ok.stdout
    assert "canceled" in cli("job", job_id).stdout
    again = cli("cancel", job_id)
    assert again.returncode == 1 and "canceled already" in again.stderr and len(again.stderr.splitlines()) == 1
    unknown = cli("cancel", "nope")
    assert unknown.returncode == 1 and "no such job" in unknown.stderr


@pytest.mark.timeout(30)
def test_inline_cancels_only_a_held_scheduled_job():
    import tests.jobs_control  # noqa: F401
    with testing.inline(run_scheduled=False) as ctx:
        later = jobs.enqueue_in(60, "forget", 1)
        now = jobs.enqueue("forget", 2)
        assert cancel(later) is True and cancel(now) is False
        assert ctx.run_scheduled() == [] and get_job(later).status == "canceled"


@pytest.mark.timeout(60)
def test_cancel_running_stops_the_job_with_term_exception_and_it_ends_canceled(r, api, spawn, cli):
    """running=True: the worker reads the request at its next beat, the job gets TermException, is not put back,
    and ends canceled; without running=True a running job is left alone."""
    job_id = jobs.enqueue("until_stopped", "c6")
    w = spawn(JOB_MODULES=MODULES, HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="3", LOG_LEVEL="INFO")
    assert r.blpop(["c6:started"], 20)
    assert cancel(job_id) is False and get_job(job_id).status == "running"
    asked = cli("cancel", job_id, "--running")
    assert asked.returncode == 0 and "asked worker" in asked.stdout
    assert r.blpop(["c6:term"], 20), "no TermException in the job"
    j = get_job(job_id).wait(timeout=20)
    assert j.status == "canceled" and j.worker and j.started_at
    w.wait_for(r"event=job\.canceled .*job=" + job_id)
    assert r.llen(K.queue("default")) == 0 and r.llen("c6:started") == 0  # not put back, not run again
    assert cancel(job_id, running=True) is False  # it has ended
    w.signal(15)
    assert w.wait(15) == 0


@pytest.mark.timeout(60)
def test_cancel_running_kills_a_job_that_swallows_term_exception_term_timeout_later(r, api, spawn):
    job_id = jobs.enqueue("stubborn", "c7")
    w = spawn(JOB_MODULES=MODULES, HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="3", TERM_TIMEOUT="1")
    assert r.blpop(["c7"], 20)  # started
    assert cancel(job_id, running=True) is True
    assert '"swallowed"' in r.blpop(["c7"], 20)[1]
    j = get_job(job_id).wait(timeout=20)
    assert j.status == "canceled" and r.llen(K.queue("default")) == 0
    w.signal(15)
    assert w.wait(15) == 0


@pytest.mark.timeout(90)
def test_cancel_running_of_a_job_whose_worker_died_is_not_run_again_by_recovery(r, api, spawn):
    """cancel(running=True) said True for a job whose worker was then SIGKILLed (whole tree) before its next beat
    read the request: recovery must end it canceled, not put it back to run again (adversarial review of issue
    24)."""
    job_id = jobs.enqueue("until_stopped", "c8")
    a = spawn(JOB_MODULES=MODULES, HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="2")
    assert r.blpop(["c8:started"], 20)
    a.kill_tree()  # a dyno crash: its beat never reads the request
    assert cancel(job_id, running=True) is True  # its hash still names the job until recovery
    b = spawn(JOB_MODULES=MODULES, HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="2")
    j = get_job(job_id).wait(timeout=40)
    assert j.status == "canceled", j.status
    assert r.llen(K.queue("default")) == 0 and r.llen("c8:started") == 0  # not run again
    b.signal(15)
    assert b.wait(15) == 0


@pytest.mark.timeout(60)
def test_cancel_running_of_a_job_that_fails_into_its_retry_before_the_beat_cancels_the_retry(r, api, spawn):
    """cancel(running=True) said True, then the job failed (retries left) before its worker's next beat read the
    request: the retry must not be scheduled to run again; the job ends canceled (adversarial review of issue 24)."""
    job_id = jobs.options("gate_fail", retries=3).enqueue("c9")
    w = spawn(JOB_MODULES=MODULES, HEARTBEAT_INTERVAL="5", HEARTBEAT_TTL="15")
    assert r.blpop(["c9:started"], 20)
    assert cancel(job_id, running=True) is True
    r.rpush("c9:go", "1")  # it fails now, well before the next beat
    j = get_job(job_id).wait(timeout=15)
    assert j.status == "canceled", j.status
    assert r.zcard(K.scheduled) == 0 and r.llen(K.queue("default")) == 0 and r.llen("c9:started") == 0
    w.signal(15)
    assert w.wait(15) == 0

