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
        CALLS[call]("push")
    assert sorted(r.keys("*")) == [key]
