"""``async def`` jobs (issue 24 item 7): run in the child with ``asyncio.run``; a stop raises ``TermException``
inside the coroutine at its current await (a sleep, a bare future, a gather, a task awaited through wait_for) or in
its sync code between awaits, cleanup awaits within the budget, and the job is put back; checkpoints, retries,
timeouts and inline mode as for sync jobs. Real worker, real signals (tests/dyno.py's Heroku-style stop)."""
from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest

from tests import dyno
from tests.support import children, next_event, processing, queued_ids, status_of, wait_until
from worker import testing

MODULES = "worker.sample,tests.jobs,tests.jobs_async"
WINDOW = 4.0


@pytest.fixture
def worker(spawn):
    def _worker(**env):
        w = spawn(**{"JOB_MODULES": MODULES, "SHUTDOWN_WINDOW": WINDOW, **env})
        w.wait_for(r"event=worker\.start")
        return w
    return _worker


def events(r, key) -> list:
    return [json.loads(x) for x in r.lrange(key, 0, -1)]


def waiting(w, how, timeout=10.0) -> None:
    """Block until the job's child waits where ``how`` says: in the loop's epoll (an await) or in time.sleep (its
    sync code), so the stop lands there and not while it still reads Redis's reply to its "started" event."""
    want = "nanosleep" if how == "sync" else "epoll"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in [c for server in children(w.pid) for c in children(server)]:  # the job child and the spare
            try:
                with open(f"/proc/{pid}/wchan") as f:
                    if want in f.read():
                        return
            except OSError:
                pass
        time.sleep(0.005)
    raise AssertionError(f"the job never waited in {want}; output:\n{w.output}")


@pytest.mark.timeout(40)
@pytest.mark.parametrize("how,times", [("sleep", 1), ("future", 1), ("gather", 1), ("task", 1), ("sync", 1),
                                       ("sleep", 20)])
def test_a_heroku_stop_raises_term_exception_at_the_await_and_puts_the_job_back(r, worker, enqueue, how, times):
    """The TermException lands in the coroutine (its except and finally run, its cleanup awaits), within 50 ms of
    the SIGTERM (measured, printed; asserted loosely: timing is bench/'s business), exactly once even when
    Heroku repeats the signal, and the job is put back; the worker exits 0 without the platform's SIGKILL."""
    w = worker()
    job_id = enqueue("aj_wait", "ev", how, cleanup=0.3)
    assert next_event(r, "ev")["event"] == "started"
    waiting(w, how)
    rep = dyno.shutdown(w.pid, mode="dyno", signum=signal.SIGTERM, window=WINDOW, times=times, interval=0.05)
    assert not rep.sigkilled, f"{rep}\n{w.output}"
    assert w.wait(5) == 0, w.output
    evs = events(r, "ev")
    assert [e["event"] for e in evs] == ["term", "cleaned", "finally"], (evs, w.output)
    latency = evs[0]["t"] - rep.signal_wall
    print(f"\n{how}: SIGTERM -> TermException in the coroutine {latency * 1000:.1f} ms")
    assert 0 <= latency < 0.25, latency
    assert evs[1]["t"] - evs[0]["t"] >= 0.3  # the cleanup's own await ran in full
    assert queued_ids(r) == [job_id] and processing(r) == {}
    assert "event=shutdown.job_put_back" in w.output


@pytest.mark.timeout(40)
def test_an_async_job_that_returns_after_the_stop_is_done(r, worker, enqueue):
    w = worker()
    job_id = enqueue("aj_wait", "ev", "sleep", cleanup=0.0, swallow=True)
    assert next_event(r, "ev")["event"] == "started"
    waiting(w, "sleep")
    rep = dyno.shutdown(w.pid, mode="dyno", window=WINDOW)
    assert not rep.sigkilled and w.wait(5) == 0, w.output
    assert [e["event"] for e in events(r, "ev")] == ["term", "cleaned", "finally"]
    assert status_of(r, job_id) == "done" and r.hget(f"worker:job:{job_id}", "result") == '"cleaned"'
    assert queued_ids(r) == []


@pytest.mark.timeout(60)
def test_async_results_retries_checkpoints_and_timeouts(r, worker, enqueue):
    """Done with its result; retried on an exception (current_job().attempt 2); a checkpointed job stopped and
    resumed where it was; a job past its timeout killed and failed like a sync one."""
    w = worker(QUEUES="default")
    ok = enqueue("aj_add", "add", 2, 3)
    failing = enqueue("aj_fail", "fail")
    slow = enqueue("aj_too_slow", "slow")
    assert next_event(r, "add")["name"] == "aj_add"
    wait_until(lambda: status_of(r, ok) == "done", 10, "aj_add done")
    assert json.loads(r.hget(f"worker:job:{ok}", "result")) == {"sum": 5}
    assert [next_event(r, "fail")["attempt"] for _ in range(2)] == [1, 2]
    wait_until(lambda: status_of(r, failing) == "failed" and status_of(r, slow) == "failed", 20, "both failed")
    assert "JobTimeout" in r.hget("worker:failed:data", slow)
    resumable = enqueue("aj_resumable", "res")
    assert next_event(r, "res")["at"] == 0
    assert next_event(r, "res")["event"] == "five"
    w.signal(signal.SIGTERM)
    assert w.wait(10) == 0, w.output
    assert queued_ids(r) == [resumable]
    w = worker(QUEUES="default")
    again = next_event(r, "res")
    assert again["event"] == "started" and again["at"] >= 5
    assert next_event(r, "res")["event"] == "finished"
    w.signal(signal.SIGTERM)
    assert w.wait(10) == 0


def test_async_jobs_run_inline_also_inside_a_running_loop():
    """testing.inline() runs an async job to completion, also from code already inside an event loop."""
    import tests.jobs_async as aj
    calls = []
    aj.event = lambda key, kind, **f: calls.append((key, kind, f))  # inline: no Redis for the job's events
    try:
        with testing.inline() as run:
            aj.aj_add.enqueue("k", 1, 2)

            async def from_a_loop():
                aj.aj_add.enqueue("k", 3, 4)
                await aj.aj_add.enqueue_async("k", 5, 6)  # the async producer runs it inline too, no Redis
            asyncio.run(from_a_loop())
        assert [j["result"] for j in run.jobs] == [{"sum": 3}, {"sum": 7}, {"sum": 11}]
        assert calls == [("k", "ran", {"name": "aj_add"})] * 3
    finally:
        from tests.jobs import event
        aj.event = event


@pytest.mark.timeout(30)
def test_sample_async_work_cleans_up_on_a_heroku_stop(r, worker, enqueue):
    """worker/sample.py's async twin of sample_work: TermException at its await, cleanup awaited, done."""
    w = worker()
    job_id = enqueue("sample_async_work", 30, 0.3)
    w.wait_for(r"event=job\.start .*name=sample_async_work")
    waiting(w, "sleep")
    rep = dyno.shutdown(w.pid, mode="dyno", window=WINDOW)
    assert not rep.sigkilled and w.wait(5) == 0, w.output
    assert "caught TermException, cleaning up" in w.output and "graceful shutdown!" in w.output
    assert "complete job!" not in w.output and status_of(r, job_id) == "done"


@pytest.mark.timeout(60)
def test_async_producers_on_the_asyncio_client(r, redis_server, monkeypatch, worker):
    """await f.enqueue_async / enqueue_in_async / enqueue_at_async and get_job_async on redis-py's asyncio client,
    connected from REDIS_URL: the sync producer's checks, routing and payload; the worker runs what they enqueue."""
    from datetime import datetime, timedelta, timezone

    import tests.jobs_async as aj
    import worker as api
    from worker import aio_broker
    monkeypatch.setenv("REDIS_URL", redis_server.url)

    async def produce():
        ids = {"add": await aj.aj_add.enqueue_async("prod", 2, 3),
               "routed": await api.enqueue_async("aj_add", "prod", 1, 1, queue="elsewhere"),
               "in": await aj.aj_add.enqueue_in_async(timedelta(hours=1), "prod", 0, 0),
               "at": await aj.aj_add.enqueue_at_async(datetime.now(timezone.utc) + timedelta(hours=2), "prod", 0, 0)}
        with pytest.raises(TypeError, match="do not fit"):
            await aj.aj_add.enqueue_async("prod", 1)
        with pytest.raises(ValueError, match="not registered"):
            await api.enqueue_async("aj_nowhere", 1)
        with pytest.raises(TypeError, match="enqueue_in"):
            await aj.aj_add.enqueue_in_async("soon", "prod", 0, 0)
        got = {k: await api.get_job_async(v) for k, v in ids.items()}
        assert await api.get_job_async("f" * 32) is None
        await aio_broker.close()
        return ids, got
    ids, got = asyncio.run(produce())
    assert {k: (j.status, j.queue, j.name) for k, j in got.items()} == {
        "add": ("queued", "default", "aj_add"), "routed": ("queued", "elsewhere", "aj_add"),
        "in": ("scheduled", "default", "aj_add"), "at": ("scheduled", "default", "aj_add")}
    (payload,) = r.lrange("worker:queue:default", 0, -1)
    doc = json.loads(payload)
    assert set(doc) == {"id", "name", "queue", "args", "kwargs", "enqueued_at", "attempts"}
    assert (doc["id"], doc["args"], doc["kwargs"]) == (ids["add"], ["prod", 2, 3], {})
    assert r.lrange("worker:queue:elsewhere", 0, -1) and r.zcard("worker:scheduled") == 2
    w = worker()
    assert next_event(r, "prod")["event"] == "ran"

    async def follow():
        done = None
        for _ in range(200):
            done = await api.get_job_async(ids["add"])
            if done.status == "done":
                break
            await asyncio.sleep(0.05)
        running_id = await aj.aj_wait.enqueue_async("ev", "sleep")
        assert next_event(r, "ev")["event"] == "started"  # sync BLPOP: fine in a test
        running = await api.get_job_async(running_id)
        await aio_broker.close()
        return done, running
    done, running = asyncio.run(follow())
    assert done.status == "done" and done.result == {"sum": 5} and done.worker
    assert running.status == "running" and running.worker and running.started_at
    w.signal(signal.SIGTERM)
    assert w.wait(10) == 0


@pytest.mark.timeout(30)
def test_per_call_options_on_the_async_producer(r, redis_server, monkeypatch):
    """f.options(...).enqueue_async / enqueue_in_async / enqueue_at_async: the sync JobCall's options, checks and
    own-id dedupe on the asyncio client (the issue 24 note named .options() missing from the async producers)."""
    from datetime import datetime, timedelta, timezone

    import tests.jobs_async as aj
    from worker import aio_broker
    monkeypatch.setenv("REDIS_URL", redis_server.url)

    async def produce():
        call = aj.aj_add.options(queue="opt", job_id="own-1", retries=4, timeout=9)
        first = await call.enqueue_async("prod", 2, 3)
        again = await call.enqueue_async("prod", 7, 7)   # that id has not ended: nothing enqueued
        later = await aj.aj_add.options(job_id="own-2").enqueue_in_async(timedelta(hours=1), "prod", 0, 0)
        at = await aj.aj_add.options(job_id="own-3").enqueue_at_async(
            datetime.now(timezone.utc) + timedelta(hours=2), "prod", 0, 0)
        with pytest.raises(TypeError, match="do not fit"):
            await call.enqueue_async("prod", 1)
        with pytest.raises(TypeError, match="delay"):
            await aj.aj_add.options(delay=5).enqueue_in_async(1, "prod", 0, 0)
        await aio_broker.close()
        return first, again, later, at
    first, again, later, at = asyncio.run(produce())
    assert (first, again, later, at) == ("own-1", "own-1", "own-2", "own-3")
    (payload,) = r.lrange("worker:queue:opt", 0, -1)
    doc = json.loads(payload)
    assert (doc["id"], doc["args"], doc["options"]) == ("own-1", ["prod", 2, 3], {"retries": 4, "timeout": 9})
    assert r.zcard("worker:scheduled") == 2 and not r.llen("worker:queue:default")


@pytest.mark.timeout(60)
def test_memory_limit_kills_an_async_job(r, worker, enqueue):
    hog = enqueue("aj_alloc", "ev", 200)
    w = worker(JOB_MAX_MEMORY_MB=100)
    wait_until(lambda: status_of(r, hog) == "failed", 30, "the hog failed")
    assert json.loads(r.hget("worker:failed:data", hog))["cause"] == "memory"
    w.signal(signal.SIGTERM)
    assert w.wait(10) == 0


@pytest.mark.timeout(40)
def test_term_grace_sets_stop_requested_then_raises_at_the_await(r, worker, enqueue):
    """With TERM_GRACE, current_job().stop_requested turns True at the SIGTERM and the TermException comes at the
    end of the grace, at the coroutine's await; the job is put back."""
    w = worker(TERM_GRACE=0.5)
    job_id = enqueue("aj_flag", "ev")
    assert next_event(r, "ev")["event"] == "started"
    rep = dyno.shutdown(w.pid, mode="dyno", window=WINDOW)
    assert not rep.sigkilled and w.wait(5) == 0, w.output
    flag, term = events(r, "ev")
    assert (flag["event"], term["event"]) == ("flag", "term")
    assert flag["t"] - rep.signal_wall < 0.25 and term["t"] - rep.signal_wall >= 0.5
    assert queued_ids(r) == [job_id]
