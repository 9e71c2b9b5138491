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
