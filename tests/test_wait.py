"""Job.wait (issue 24 item 1): blocks until the job has ended, woken by the script that records its outcome; a
failed job is returned, not raised; TimeoutError when time runs out; result_ttl=0 still gives the result; inline
mode returns at once."""
import threading
import time

import pytest

from worker import jobs, testing
from worker.keys import Keys
from worker.results import get_job

from tests.support import redis_down, redis_up, wait_until

MODULES = "worker.sample,tests.jobs,tests.jobs_control"
K = Keys()


@pytest.fixture
def api(r, module_broker):
    import tests.jobs_control  # noqa: F401  (registers the jobs here too, with their queues)
    return module_broker(MODULES)


@pytest.mark.timeout(60)
def test_wait_returns_the_done_job_when_its_outcome_is_recorded(r, api, spawn):
    job_id = jobs.enqueue("gate", "w1")
    spawn(JOB_MODULES=MODULES)
    assert r.blpop(["w1:started"], 20)
    with pytest.raises(TimeoutError):
        get_job(job_id).wait(timeout=0.2)  # running: not ended yet
    got = {}

    def waiter():
        got["job"] = get_job(job_id).wait(timeout=20)
        got["at"] = time.monotonic()
    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.3)  # the waiter is blocked now (a slow start only makes the push come first: still returns)
    r.rpush("w1:go", "the result")
    t.join(25)
    j = got["job"]
    assert (j.status, j.result) == ("done", "the result")
    assert 0 < r.pttl(K.done(job_id)) <= 60_000  # what the outcome pushed expires


@pytest.mark.timeout(60)
def test_wait_returns_a_failed_job_and_a_forgotten_result(r, api, spawn):
    failing = jobs.enqueue("gate_fail", "w2")
    forgotten = jobs.enqueue("forget", {"x": 1})  # result_ttl=0: the record goes with the outcome
    forgotten_job = get_job(forgotten)
    r.rpush("w2:go", "1")
    spawn(JOB_MODULES=MODULES)
    j = get_job(failing).wait(timeout=20)
    assert j.status == "failed" and j.error["type"] == "ValueError"
    f = forgotten_job.wait(timeout=20)
    assert f is not None and (f.status, f.result) == ("done", {"x": 1})
    assert get_job(forgotten) is None


@pytest.mark.timeout(30)
def test_jobs_nobody_waits_for_get_no_done_list(r, api, spawn):
    ids = [jobs.enqueue("quick", "w3") for _ in range(3)]
    spawn(JOB_MODULES=MODULES)
    for _ in ids:
        assert r.blpop(["w3"], 20)
    get_job(ids[-1]).wait(timeout=20)
    assert get_job(ids[-1]).status == "done"
    assert r.keys(K.done("*")) in ([], [K.done(ids[-1])])  # only the one waited for
    assert r.exists(K.done(ids[0])) == 0


@pytest.mark.timeout(30)
def test_wait_on_an_unknown_id_is_none_and_bad_timeouts_are_refused(r, api):
    from worker.results import wait
    assert wait("nope", timeout=1) is None
    with pytest.raises(ValueError):
        wait("nope", timeout=-1)
    assert r.keys("*") == []  # the mark creates no record


@pytest.mark.timeout(30)
def test_inline_wait_returns_at_once():
    import tests.jobs_control  # noqa: F401
    with testing.inline():
        job_id = jobs.enqueue("forget", 5)
        started = time.monotonic()
        j = get_job(job_id).wait(timeout=0)
        assert (j.status, j.result) == ("done", 5) and time.monotonic() - started < 0.1


@pytest.mark.timeout(60)
def test_wait_rides_over_a_wrong_typed_done_key(r, api, spawn):
    """A P:done:<id> of the wrong type (another program's key) must not make wait() raise WRONGTYPE: it re-reads
    the status each slice and returns the job once it has ended (adversarial review of issue 24)."""
    job_id = jobs.enqueue("gate", "w9", "v")
    r.set(K.done(job_id), "not a list")
    spawn(JOB_MODULES=MODULES)
    assert r.blpop(["w9:started"], 20)
    with pytest.raises(TimeoutError):  # it blocks (the job waits for its go), not WRONGTYPE
        get_job(job_id).wait(timeout=0.3)
    r.rpush("w9:go", "1")
    j = get_job(job_id).wait(timeout=20)
    assert j.status == "done" and j.result == "v"


@pytest.mark.timeout(60)
def test_wait_rides_out_a_redis_restart(r, api, spawn, redis_server):
    """A Redis restart (or failover) while a producer waits: the wait tries again until Redis is back and returns
    the job's final record (the issue 24 note: it raised ConnectionError after ~0.9 s); a wait whose timeout runs
    out while Redis is still down re-raises the connection error, not TimeoutError."""
    import redis
    job_id = jobs.enqueue("gate", "w9")
    got = {}

    def waiter():
        try:
            got["job"] = get_job(job_id).wait(timeout=40)
        except BaseException as exc:  # noqa: BLE001 (the test reports it)
            got["error"] = exc
    t = threading.Thread(target=waiter)
    t.start()
    wait_until(lambda: r.pttl(K.job(job_id)) > 0, 10, "the waiter's mark on the record")
    redis_down(redis_server)
    with pytest.raises(redis.ConnectionError):
        get_job(job_id).wait(timeout=0.8)  # the outage outlasts this one's timeout
    assert t.is_alive() and not got
    redis_up(redis_server)
    r.rpush("w9:go", "after the restart")
    spawn(JOB_MODULES=MODULES)
    t.join(30)
    assert "error" not in got, got.get("error")
    assert (got["job"].status, got["job"].result) == ("done", "after the restart")
