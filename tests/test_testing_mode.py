"""Item 5 of issue 12: ``worker.testing``: inline mode (no Redis at all) and the burst-worker helper (real Redis)."""
from __future__ import annotations

import json
import socket
import time
from datetime import datetime, timedelta, timezone

import pytest
import redis

import worker
from worker import checkpoint, jobs, last_checkpoint, testing

from tests.conftest import REPO
import tests.jobs  # noqa: F401  (registers push and fail, enqueued for the burst worker)

FIELDS = {"id", "name", "queue", "status", "result", "error", "attempts", "enqueued_at", "started_at", "ended_at"}
calls: list = []


@jobs.job(name="tm_add", queue="math")
def tm_add(x, y=1):
    calls.append(("tm_add", x, y))
    return {"sum": x + y}


@jobs.job(name="tm_echo")
def tm_echo(value):
    calls.append(("tm_echo", value))
    return value


@jobs.job(name="tm_boom")
def tm_boom(message):
    raise ValueError(message)


@jobs.job(name="tm_bad_result", strict_result=True)
def tm_bad_result():
    return {1, 2}


@jobs.job(name="tm_parent")
def tm_parent(n):
    return [tm_echo.enqueue(i) for i in range(n)]  # enqueue from inside a job: runs inline too


@jobs.job(name="tm_resumable")
def tm_resumable(items):
    start = last_checkpoint(0)
    for i in range(start, items):
        checkpoint(i + 1)
    return start


@pytest.fixture(autouse=True)
def _clean():
    calls.clear()
    yield
    jobs.use(None)


@pytest.fixture
def no_redis(monkeypatch):
    """REDIS_URL points at a port that listens but is never served: any connection attempt shows up there."""
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen(16)
    trap.setblocking(False)
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{trap.getsockname()[1]}/0")
    monkeypatch.setenv("REDIS_TIMEOUT", "0.2")
    jobs.use(None)  # no broker left over from another test: the first enqueue would connect from REDIS_URL

    def attempts() -> int:
        n = 0
        while True:
            try:
                conn, _ = trap.accept()
            except BlockingIOError:
                return n
            conn.close()
            n += 1
    yield attempts
    trap.close()


def test_inline_runs_every_enqueue_form_without_any_redis(no_redis):
    with testing.inline() as run:
        a = worker.enqueue("tm_add", 2, y=3)
        b = tm_add.enqueue(4)
        c = worker.enqueue_in(60, "tm_echo", (1, "x"))        # a tuple: a list after the JSON round trip
        d = tm_echo.enqueue_at(datetime.now(timezone.utc) + timedelta(hours=1), "later")
        many = worker.enqueue_many("tm_add", [(1,), ((5,), {"y": 5})])
        assert testing.active()
        recs = {i: testing.lookup(i) for i in (a, b, c, d, *many)}
    assert no_redis() == 0, "inline mode connected to Redis"
    assert calls == [("tm_add", 2, 3), ("tm_add", 4, 1), ("tm_echo", [1, "x"]), ("tm_echo", "later"),
                     ("tm_add", 1, 1), ("tm_add", 5, 5)]
    assert all(set(rec) == FIELDS and rec["status"] == "done" and rec["attempts"] == 1 for rec in recs.values())
    assert recs[a]["result"] == {"sum": 5} and recs[a]["queue"] == "math" and recs[a]["name"] == "tm_add"
    assert recs[c]["result"] == [1, "x"] and recs[c]["queue"] == "default"
    assert recs[a]["enqueued_at"] <= recs[a]["started_at"] <= recs[a]["ended_at"]
    assert [j["id"] for j in run.jobs] == [a, b, c, d, *many]
    assert not testing.active() and testing.lookup(a) is None  # the records live as long as the block


def test_the_trap_does_see_a_real_enqueue(no_redis):
    """Control for the test above: outside inline mode the same enqueue connects to REDIS_URL."""
    with pytest.raises(redis.RedisError):
        worker.enqueue("tm_echo", 1)
    assert no_redis() >= 1


def test_arguments_that_are_not_json_fail_at_enqueue_as_for_real(no_redis):
    with testing.inline() as run:
        with pytest.raises(TypeError, match="JSON-serialisable"):
            tm_echo.enqueue(datetime.now())
        with pytest.raises(ValueError, match="not registered in this process"):
            worker.enqueue("tm_not_a_job", 1, queue="default")
    assert run.jobs == [] and calls == [] and no_redis() == 0


def test_a_failing_job_raises_and_is_recorded(no_redis):
    with testing.inline() as run:
        with pytest.raises(ValueError, match="no luck"):
            tm_boom.enqueue("no luck")
        (rec,) = run.jobs
        assert rec["status"] == "failed" and rec["error"]["type"] == "ValueError"
        assert rec["error"]["message"] == "no luck" and "tm_boom" in rec["error"]["traceback"]
        assert testing.lookup(rec["id"]) == rec


def test_raise_errors_false_only_records(no_redis):
    with testing.inline(raise_errors=False) as run:
        boom = tm_boom.enqueue("quiet")
        bad = tm_bad_result.enqueue()
        with pytest.raises(TypeError, match="do not fit"):  # refused at the call, as in production (issue 21)
            worker.enqueue("tm_echo", 1, 2)
        ok = tm_echo.enqueue("fine")
        got = {i: run.get(i) for i in (boom, bad, ok)}
    assert got[boom]["status"] == "failed" and got[boom]["error"]["message"] == "quiet"
    assert got[bad]["status"] == "failed" and got[bad]["error"]["type"] == "TypeError"
    assert "not JSON" in got[bad]["error"]["message"]
    assert got[ok]["status"] == "done" and got[ok]["result"] == "fine"
    assert no_redis() == 0


def test_scheduled_jobs_can_be_held_and_run_later(no_redis):
    with testing.inline(run_scheduled=False) as run:
        now = tm_echo.enqueue("now")
        later = tm_echo.enqueue_in(30, "later")
        past = tm_echo.enqueue_at(datetime.now(timezone.utc) - timedelta(seconds=5), "past")  # due: runs
        assert run.get(later)["status"] == "scheduled" and calls == [("tm_echo", "now"), ("tm_echo", "past")]
        assert run.get(later)["enqueued_at"] > time.time() + 25  # when it becomes due, as in a real payload
        assert run.run_scheduled() == [later]
        assert run.get(later)["status"] == "done" and run.get(now)["status"] == run.get(past)["status"] == "done"
    assert no_redis() == 0


def test_nested_enqueue_and_checkpoints_work_inline(no_redis):
    with testing.inline() as run:
        parent = tm_parent.enqueue(2)
        resumable = tm_resumable.enqueue(3)
        children = run.get(parent)["result"]
        assert [run.get(c)["result"] for c in children] == [0, 1]
        assert run.get(resumable)["result"] == 0  # last_checkpoint(default); checkpoint() was a no-op
    with pytest.raises(RuntimeError, match="inside a job"):
        checkpoint(1)  # outside inline mode and outside a worker, as before
    assert no_redis() == 0


def test_blocks_nest_and_restore_the_previous_broker(no_redis):
    sentinel = object()
    jobs.use(sentinel)
    with testing.inline() as outer:
        a = tm_echo.enqueue("a")
        with testing.inline() as inner:
            b = tm_echo.enqueue("b")
            assert testing.lookup(a)["result"] == "a" and testing.lookup(b)["result"] == "b"
        assert inner.get(b) and outer.get(b) is None and testing.lookup(b) is None
        assert jobs._default is outer
    assert jobs._default is sentinel


def test_get_job_answers_from_inline_mode(no_redis):
    get_job = worker.get_job
    with testing.inline(raise_errors=False):
        ok, bad = tm_add.enqueue(1), tm_boom.enqueue("x")
        assert get_job(ok).status == "done" and get_job(ok).result == {"sum": 2}
        assert get_job(bad).status == "failed" and get_job(bad).error["type"] == "ValueError"
        assert get_job("0" * 32) is None
    assert no_redis() == 0


# --- run_burst: a real worker against the suite's redis-server ---

def test_run_burst_drains_the_queues_and_returns(r, redis_server, env):
    from worker.config import from_mapping
    from worker.fetch import Broker
    jobs.use(Broker(r, from_mapping({"REDIS_URL": redis_server.url})))
    for i in range(3):
        worker.enqueue("push", "burst:out", f"v{i}")
    worker.enqueue("fail", "on purpose")
    res = testing.run_burst(redis_server.url, queues=["default"], job_modules=["tests.jobs"], cwd=str(REPO),
                            env={"LOG_LEVEL": "INFO", "PYTHONPATH": str(REPO)}, timeout=60)
    assert res.ok and res.returncode == 0, res.output
    assert r.lrange("burst:out", 0, -1) == ["v0", "v1", "v2"]
    assert r.llen("worker:queue:default") == 0 and r.zcard("worker:failed") == 1
    assert "event=job.failed" in res.output or "job.failed" in res.output, res.output


def test_run_burst_times_out_and_kills_the_worker(r, redis_server):
    r.rpush("worker:queue:default", json.dumps({"id": "a" * 32, "name": "sample_work", "queue": "default",
                                                "args": [30], "kwargs": {}, "enqueued_at": time.time()}))
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="still running after 3s"):
        testing.run_burst(redis_server.url, queues=["default"], job_modules=["worker.sample"], cwd=str(REPO),
                          timeout=3)
    assert time.monotonic() - t0 < 10


def test_run_burst_never_runs_an_apps_own_worker_py(redis_server, tmp_path):
    """Issue 21 item 1: run_burst ran `python -m worker` in the app's directory, which runs an app's own worker.py
    (Heroku's RQ guide creates one) and exits 0. It runs the package, and beside such a file exits 2 naming it."""
    marker = tmp_path / "ran"
    (tmp_path / "worker.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (tmp_path / "appjobs_21.py").write_text("from worker import job\n\n\n@job\ndef hello():\n    pass\n")
    env = {"PYTHONPATH": ""}  # as in an app: only the installed package (here: found through run_burst itself)
    res = testing.run_burst(redis_server.url, queues=["default"], job_modules=["appjobs_21"], cwd=str(tmp_path),
                            env=env, timeout=30)
    assert res.returncode == 2 and not marker.exists(), res.output
    assert str(tmp_path / "worker.py") in res.output and "rename" in res.output, res.output
    (tmp_path / "worker.py").unlink()
    res = testing.run_burst(redis_server.url, queues=["default"], job_modules=["appjobs_21"], cwd=str(tmp_path),
                            env=env, timeout=30)
    assert res.ok and "jobs=hello@default" in res.output, res.output


@jobs.job(name="tm_ctx", queue="ctxq")
def tm_ctx(tag):
    c = worker.current_job()
    calls.append((tag, c.id, c.name, c.queue, c.attempt, c.enqueued_at, c.stop_requested))
    if tag == "outer":
        tm_ctx.enqueue("inner")  # runs inline, nested: its own context, then the outer one again
        assert worker.current_job() is c
    return c.id


def test_current_job_inline(no_redis):
    """Issue 24 item 5: inline mode sets current_job() for the job (nested jobs included), None outside."""
    assert worker.current_job() is None
    with testing.inline() as run:
        outer = tm_ctx.enqueue("outer")
        assert worker.current_job() is None
    inner = run.jobs[1]["id"]
    (_, oid, name, queue, attempt, at, stop), (_, iid, *_rest) = calls
    assert (oid, name, queue, attempt, stop) == (outer, "tm_ctx", "ctxq", 1, False)
    assert at == run.jobs[0]["enqueued_at"] and iid == inner != outer


@jobs.job(name="tm_no_retry", retries=3, dont_retry=(ValueError,))
def tm_no_retry(kind):
    raise (UnicodeError if kind == "value" else OSError)(kind)


def test_dont_retry_inline_records_what_a_worker_would_do(no_redis):
    """Issue 24 item 6: inline mode runs one attempt; the error record says a worker would not retry it."""
    with testing.inline(raise_errors=False) as run:
        tm_no_retry.enqueue("value")
        tm_no_retry.enqueue("io")
    value, io = run.jobs
    assert value["error"]["retryable"] is False and "retryable" not in io["error"]


@jobs.job(name="tm_odd_result")
def tm_odd_result():
    return {1, 2}


def test_a_result_that_is_not_json_is_done_with_a_marker_inline(no_redis):
    """Issue 24 item 8, inline: done with the marker and a warning, as on a worker; strict_result fails it."""
    with testing.inline() as run:
        tm_odd_result.enqueue()
        with pytest.raises(TypeError, match="not JSON"):
            tm_bad_result.enqueue()
    odd, strict = run.jobs
    assert odd["status"] == "done" and odd["result"] == {"unserializable": "set", "repr": "{1, 2}"}
    assert "result_unserializable" in odd["warning"] and strict["status"] == "failed"
