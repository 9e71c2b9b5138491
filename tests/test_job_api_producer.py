"""Item 2 of issue 12: enqueue is explicit about where a job goes (real redis-server).

A name registered in the calling process goes to its ``@job(queue=)``; a name that is not needs ``queue=``, or the
call is refused with a message saying how to fix it, and nothing reaches Redis. The CLI follows the same rule.
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

import worker
from worker import config, jobs
from worker.fetch import Broker

import tests.jobs  # noqa: F401  (registers push, queue "default")


@jobs.job(queue="mail", name="producer_mail")
def producer_mail(user_id):
    return user_id


@pytest.fixture
def broker(r, redis_server):
    b = Broker(r, config.from_mapping({"REDIS_URL": redis_server.url}))
    jobs.use(b)
    yield b
    jobs.use(None)


CALLS = {
    "enqueue": lambda name, **kw: worker.enqueue(name, 7, **kw),
    "enqueue_in": lambda name, **kw: worker.enqueue_in(30, name, 7, **kw),
    "enqueue_at": lambda name, **kw: worker.enqueue_at(datetime.now(timezone.utc) + timedelta(hours=1), name, 7, **kw),
    "enqueue_many": lambda name, **kw: worker.enqueue_many(name, [(7,), (8,)], **kw),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_unregistered_name_without_queue_is_refused_and_nothing_is_written(r, broker, call):
    with pytest.raises(ValueError) as err:
        CALLS[call]("send_welcom")  # misspelt, or its module not imported here
    msg = str(err.value)
    assert "'send_welcom' is not registered in this process" in msg
    assert "import myapp.jobs" in msg and "queue=" in msg
    assert r.dbsize() == 0


@pytest.mark.parametrize("call", sorted(CALLS))
def test_unregistered_name_with_an_explicit_queue_is_accepted(r, broker, call):
    out = CALLS[call]("defined_elsewhere", queue="mail")
    ids = out if isinstance(out, list) else [out]
    raw = r.lrange("worker:queue:mail", 0, -1) + r.zrange("worker:scheduled", 0, -1)
    docs = [json.loads(p) for p in raw]
    assert sorted(d["id"] for d in docs) == sorted(ids)
    assert {d["queue"] for d in docs} == {"mail"} and {d["name"] for d in docs} == {"defined_elsewhere"}


def test_registered_names_keep_their_own_queue(r, broker):
    a = worker.enqueue("producer_mail", 1)
    b = producer_mail.enqueue(2)
    c = worker.enqueue("push", "k", "v")
    assert [json.loads(p)["id"] for p in r.lrange("worker:queue:mail", 0, -1)] == [a, b]
    assert [json.loads(p)["id"] for p in r.lrange("worker:queue:default", 0, -1)] == [c]
    d = worker.enqueue("producer_mail", 3, queue="other")  # an explicit queue still wins
    assert [json.loads(p)["id"] for p in r.lrange("worker:queue:other", 0, -1)] == [d]


def test_cli_refuses_an_unknown_name_without_queue(r, cli):
    out = cli("enqueue", "send_welcom", "--args", "[7]")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "'send_welcom' is not registered by JOB_MODULES=worker.sample,tests.jobs" in out.stderr
    assert "--queue" in out.stderr
    assert r.dbsize() == 0


def test_cli_accepts_an_unknown_name_with_queue_and_warns(r, cli):
    out = cli("enqueue", "defined_elsewhere", "--args", "[7]", "--queue", "mail")
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert "warning: job 'defined_elsewhere' is not registered" in out.stderr
    (raw,) = r.lrange("worker:queue:mail", 0, -1)
    doc = json.loads(raw)
    assert doc["id"] == out.stdout.strip() and doc["name"] == "defined_elsewhere" and doc["args"] == [7]


def test_cli_still_checks_arguments_of_a_registered_name(r, cli):
    out = cli("enqueue", "push", "--args", "[1, 2, 3]", "--queue", "default")
    assert out.returncode == 2 and "arguments do not fit push" in out.stderr
    assert r.dbsize() == 0


# --- issue 21: what a producer gets wrong is refused at the call ---

def test_arguments_that_do_not_fit_a_registered_job_raise_at_the_call(r, broker):
    """Issue 21 item 7: like Celery's .delay, a registered job's signature is checked in the calling process; the
    job never reaches Redis (it would only fail on the worker)."""
    for call in (lambda: worker.enqueue("producer_mail"), lambda: producer_mail.enqueue(1, 2),
                 lambda: worker.enqueue_in(5, "producer_mail", nope=1),
                 lambda: worker.enqueue_at(datetime.now(timezone.utc), "producer_mail"),
                 lambda: worker.enqueue_many("producer_mail", [(1,), ()])):
        with pytest.raises(TypeError, match=r"arguments do not fit producer_mail\(user_id\)"):
            call()
    assert r.dbsize() == 0
    worker.enqueue("defined_elsewhere", 1, 2, 3, queue="mail")  # not registered here: not checked
    assert r.llen("worker:queue:mail") == 1


def test_enqueue_in_and_enqueue_at_take_timedelta_and_datetime_and_refuse_the_rest(r, broker):
    """Issue 21 (also) / issue 27 item 10: a timedelta delay works; anything but a datetime in enqueue_at (a unix
    time, a date, None) is a TypeError naming the accepted types, not an AttributeError."""
    from datetime import date
    worker.enqueue_in(timedelta(minutes=5), "producer_mail", 1)
    worker.enqueue_at(datetime.now(timezone.utc) + timedelta(hours=1), "producer_mail", 2)
    assert r.zcard("worker:scheduled") == 2
    for bad in (1234567890.0, 5, date.today(), None, "2030-01-01"):
        with pytest.raises(TypeError, match="datetime.datetime"):
            worker.enqueue_at(bad, "producer_mail", 3)
    for bad in (None, "5", date.today(), True):
        with pytest.raises(TypeError, match="timedelta"):
            worker.enqueue_in(bad, "producer_mail", 3)
    assert r.zcard("worker:scheduled") == 2


def test_enqueue_many_says_what_each_element_means_and_refuses_the_rest(r, broker):
    """Issue 21 (also): `enqueue_many("quick", [{"tag": "a"}])` enqueued quick("tag"). A list/tuple is the
    positional arguments; an (args, kwargs) pair is both; a dict, string or number is refused, nothing written."""
    for bad in ([{"user_id": 1}], ["ab"], [7], [None], {"user_id": 1}, "ab"):
        with pytest.raises(TypeError, match="enqueue_many"):
            worker.enqueue_many("producer_mail", bad)
    assert r.dbsize() == 0
    worker.enqueue_many("producer_mail", [(1,), [2], ((), {"user_id": 3}), ([4], {})])
    docs = [json.loads(p) for p in r.lrange("worker:queue:mail", 0, -1)]
    assert [(d["args"], d["kwargs"]) for d in docs] == [([1], {}), ([2], {}), ([], {"user_id": 3}), ([4], {})]


def _producer(tmp_path, env, code):
    import subprocess
    import sys
    from tests.conftest import REPO
    e = {k: v for k, v in env.items() if k != "REDIS_URL"}
    e["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=e, capture_output=True, text=True,
                          timeout=30)


def test_the_producer_reads_dotenv_without_writing_the_environment(r, env, redis_server, tmp_path):
    """Issue 21 item 8: the first enqueue loaded the working directory's .env into os.environ (an unrelated
    secret appeared in the web process). The producer uses .env's REDIS_URL and leaves os.environ alone."""
    (tmp_path / ".env").write_text(f"REDIS_URL={redis_server.url}\nUNRELATED_SECRET=xyz\n")
    res = _producer(tmp_path, env, "import os, worker\n"
                    "print(worker.enqueue('noop', queue='dotenvq'))\n"
                    "print('UNRELATED_SECRET' in os.environ, 'REDIS_URL' in os.environ)")
    assert res.returncode == 0, res.stderr
    job_id, flags = res.stdout.split()[0], res.stdout.split()[1:]
    assert flags == ["False", "False"], res.stdout
    assert json.loads(r.lrange("worker:queue:dotenvq", 0, -1)[0])["id"] == job_id


def test_a_refused_connection_names_redis_url_and_the_address_tried(env, tmp_path):
    """Issue 21 item 2: the producer's ConnectionError says which Redis it tried (password masked) and that the
    address comes from REDIS_URL."""
    from tests.support import free_port
    url = f"redis://:pw-hidden-21@127.0.0.1:{free_port()}/0"
    (tmp_path / ".env").write_text(f"REDIS_URL={url}\n")
    res = _producer(tmp_path, env, "import redis, worker\ntry:\n    worker.enqueue('noop', queue='q')\n"
                    "except redis.ConnectionError as exc:\n    print(exc)\n")
    assert res.returncode == 0, res.stderr
    assert "REDIS_URL" in res.stdout and url.split("@")[1] in res.stdout, res.stdout
    assert "pw-hidden-21" not in res.stdout + res.stderr


@pytest.mark.parametrize("key", ["worker:wake:default", "worker:queues"])
def test_enqueue_beside_a_wrong_typed_index_queues_the_job_and_does_not_raise(r, broker, key):
    """Issue 27 item 2: with P:wake:<q> (or P:queues) of the wrong type, enqueue raised WRONGTYPE after the job was
    queued: an app that retries enqueued it twice. What follows the push is bookkeeping and cannot raise."""
    r.set(key, "junk")
    job_id = worker.enqueue("push", "k", "v")
    assert [json.loads(p)["id"] for p in r.lrange("worker:queue:default", 0, -1)] == [job_id]


@pytest.mark.parametrize("call,key", [("enqueue", "worker:queue:default"), ("enqueue_in", "worker:scheduled")])
def test_enqueue_into_a_wrong_typed_queue_raises_before_writing_anything(r, broker, call, key):
    """Issue 27 item 2: the key that takes the job is checked before the first write: the error names it, and
    nothing was written (a retry by the app cannot make two)."""
    r.set(key, "junk")
    with pytest.raises(Exception, match=f"WRONGTYPE {key} is a string"):
        CALLS[call]("fail")  # fail(message): one argument, as CALLS passes
    assert sorted(r.keys("*")) == [key]


# --- per-call options and own job ids (issue 24 items 3 and 4) ---

CONTROL = "worker.sample,tests.jobs,tests.jobs_control"


@pytest.mark.timeout(30)
def test_options_are_checked_at_the_call_with_a_clear_message(r, broker):
    """Issue 24 item 3: each bad option raises at .options(), naming it; nothing reaches Redis."""
    import tests.jobs_control as jc
    bad = [(dict(queue="no spaces"), ValueError, "queue"), (dict(retries="5"), TypeError, "retries"),
           (dict(retries=1.5), TypeError, "retries"), (dict(timeout=-1), ValueError, "timeout"),
           (dict(timeout=True), TypeError, "timeout"), (dict(result_ttl=10 ** 12), ValueError, "result_ttl"),
           (dict(max_interruptions=-2), ValueError, "max_interruptions"), (dict(delay="soon"), TypeError, "seconds"),
           (dict(delay=-3), ValueError, "delay"), (dict(job_id="has space"), ValueError, "job_id"),
           (dict(job_id="x" * 101), ValueError, "job_id"), (dict(job_id=7), TypeError, "job_id"),
           (dict(job_id="naïve"), ValueError, "job_id")]
    for opts, kind, word in bad:
        with pytest.raises(kind, match=word):
            jc.quick.options(**opts)
    with pytest.raises(TypeError):
        jc.quick.options(colour="red")
    with pytest.raises(TypeError, match="delay"):
        jc.quick.options(delay=5).enqueue_in(5, "k")
    with pytest.raises(TypeError, match="arguments do not fit"):
        jc.quick.options(queue="q").enqueue()
    assert r.keys("*") == []
    assert jc.quick.options(job_id="Aa0-_.:" + "z" * 93).enqueue("k") == "Aa0-_.:" + "z" * 93


@pytest.mark.timeout(30)
def test_options_travel_in_the_payload_and_a_delay_schedules(r, broker):
    import tests.jobs_control as jc
    job_id = jc.quick.options(queue="other", timeout=2.5, retries=0, result_ttl=0, job_id="welcome-42").enqueue(
        "k", value="v")
    assert job_id == "welcome-42"
    doc = json.loads(r.lindex("worker:queue:other", 0))
    assert doc["id"] == "welcome-42" and doc["kwargs"] == {"value": "v"}
    assert doc["options"] == {"timeout": 2.5, "retries": 0, "result_ttl": 0}
    later = jc.quick.options(delay=timedelta(minutes=5)).enqueue("k")
    at = jobs.options("quick", queue="mail").enqueue_at(datetime.now(timezone.utc) + timedelta(hours=1), "k")
    assert r.zcard("worker:scheduled") == 2 and worker.get_job(later).status == "scheduled"
    assert json.loads(r.zrange("worker:scheduled", -1, -1)[0])["queue"] == "mail" and at
    assert "options" not in json.loads(r.zrange("worker:scheduled", 0, 0)[0])  # none given: none carried


@pytest.mark.timeout(60)
def test_an_own_job_id_enqueues_nothing_while_its_job_has_not_ended(r, broker, spawn):
    """Issue 24 item 4: queued, scheduled, running: the same id comes back and nothing is enqueued; done: reusable."""
    import tests.jobs_control as jc
    assert jc.gate.options(job_id="only-one").enqueue("g1", "first") == "only-one"
    assert jc.gate.options(job_id="only-one").enqueue("g1", "second") == "only-one"  # queued
    assert r.llen("worker:queue:default") == 1
    assert jc.quick.options(job_id="later-1", delay=60).enqueue("k") == "later-1"
    assert jc.quick.options(job_id="later-1", delay=60).enqueue("k") == "later-1"  # scheduled
    assert r.zcard("worker:scheduled") == 1
    w = spawn(JOB_MODULES=CONTROL)
    assert r.blpop(["g1:started"], 20)
    assert jc.gate.options(job_id="only-one").enqueue("g1", "third") == "only-one"  # running
    assert r.llen("worker:queue:default") == 0
    r.rpush("g1:go", "x")
    j = worker.get_job("only-one").wait(timeout=20)
    assert (j.status, j.result) == ("done", "first")
    assert jc.gate.options(job_id="only-one").enqueue("g1", "again") == "only-one"  # ended: reusable
    assert r.blpop(["g1:started"], 20)
    r.rpush("g1:go", "x")
    assert worker.get_job("only-one").wait(timeout=20).result == "again"
    w.signal(15)
    assert w.wait(15) == 0


@pytest.mark.timeout(60)
def test_the_worker_applies_per_call_options_over_the_jobs_own(r, broker, spawn):
    """Issue 24 item 3: timeout=, retries= and result_ttl= given at the call win over @job's."""
    import tests.jobs_control as jc
    slow = jobs.options("too_slow", timeout=0.5).enqueue("s1")  # @job(timeout=1): 0.5 s is ours
    once = jc.fail_often.options(retries=0).enqueue("f1")       # @job(retries=3): failed at once
    gone = jc.gate.options(result_ttl=0).enqueue("t1", "v")     # @job(result_ttl=60): not kept
    r.rpush("t1:go", "x")
    spawn(JOB_MODULES=CONTROL)
    s = worker.get_job(slow).wait(timeout=20)
    assert s.status == "failed" and s.error["type"] == "JobTimeout" and "0.5 s" in s.error["message"]
    f = worker.get_job(once).wait(timeout=20)
    assert f.status == "failed" and r.llen("f1") == 1
    from tests.support import wait_until
    wait_until(lambda: r.llen("t1:started") == 1 and r.exists("worker:job:" + gone) == 0, 20, "its record gone")


@pytest.mark.timeout(30)
def test_inline_mode_honours_queue_delay_and_own_ids():
    import tests.jobs_control as jc
    with worker.testing.inline(run_scheduled=False) as ctx:
        a = jc.forget.options(queue="other").enqueue(1)
        assert ctx.get(a)["queue"] == "other" and ctx.get(a)["status"] == "done"
        b = jc.forget.options(delay=60, job_id="held").enqueue(2)
        assert jc.forget.options(job_id="held").enqueue(3) == "held" and len(ctx.jobs) == 2
        assert ctx.run_scheduled() == ["held"] and ctx.get(b)["result"] == 2
        assert jc.forget.options(job_id="held").enqueue(4) == "held" and ctx.get("held")["result"] == 4
