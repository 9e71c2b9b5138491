"""Long jobs survive restarts: checkpoint() / last_checkpoint() through real stops (the dyno emulator), whole-tree
SIGKILLs, the TERM_TIMEOUT kill, max_interruptions, and no checkpoint left behind once a job ends; a checkpoint the
worker cannot decode (deep nesting) or checkpoints from several threads at once leave the worker and the report
intact."""
import json
import os
import random
import signal
import time

import pytest

from tests import dyno
from tests.support import (descendants, heartbeat, name_of, next_event, processing, redis_ms, status_of, still_works,
                           wait_until)
from worker.keys import Keys

MODULES = "worker.sample,tests.jobs,tests.jobs_checkpoint"
FAST = {"JOB_MODULES": MODULES, "HEARTBEAT_INTERVAL": "0.5", "HEARTBEAT_TTL": "1.5"}
K = Keys()


def enqueue(cli, name, *args, **kwargs) -> str:
    res = cli("enqueue", name, "--args", json.dumps(list(args)), "--kwargs", json.dumps(kwargs), JOB_MODULES=MODULES)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def items(r, key) -> list:
    return [int(x) for x in r.lrange(key, 0, -1)]


def kill_tree(w) -> None:
    for pid in [w.pid] + descendants(w.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    w.popen.wait(10)


def all_dead_expired(r) -> bool:
    """Every registered worker left is past its own deadline (so a worker starting now recovers them all)."""
    sec, usec = r.time()
    return all(score < sec * 1000 + usec / 1000 for _, score in r.zrange(K.workers, 0, -1, withscores=True))


def no_checkpoint_fields(r) -> bool:
    return not any(f.startswith("ckpt:") for k in r.keys(K.worker("*")) for f in r.hkeys(k))


@pytest.mark.timeout(90)
def test_a_200_item_job_stopped_three_times_finishes_with_nothing_skipped(r, cli, spawn):
    enqueue(cli, "ck_items", "it", 200, 0.05)
    for stop in range(1, 4):  # three Heroku-style stops, each on a new worker
        w = spawn(**FAST)
        before = r.llen("it")
        wait_until(lambda: r.llen("it") >= before + 25, 30, f"progress before stop {stop}")
        report = dyno.shutdown(w.pid, mode="dyno", window=10)
        assert not report.sigkilled and w.wait(5) == 0, w.output
        assert f"interruptions={stop}" in w.output, w.output
        head = json.loads(r.lindex(K.queue("default"), 0))
        # the item is recorded, then checkpointed: a stop between the two leaves it to be done again (once)
        assert head["interruptions"] == stop and head["checkpoint"] in (max(items(r, "it")) + 1, max(items(r, "it")))
    w = spawn("--burst", **FAST)
    assert w.wait(30) == 0, w.output
    done = items(r, "it")
    assert set(done) == set(range(200)), "an item was skipped"
    assert len(done) - 200 <= 3, f"{len(done) - 200} items done twice over 3 interruptions"
    runs = [json.loads(e)["at"] for e in r.lrange("it:runs", 0, -1)]
    assert len(runs) == 4 and runs == sorted(runs) and runs[0] == 0 and all(a > 0 for a in runs[1:])
    assert r.llen(K.queue("default")) == 0 and no_checkpoint_fields(r)


@pytest.mark.timeout(90)
def test_whole_tree_sigkill_redoes_at_most_a_heartbeat_of_work(r, cli, spawn):
    enqueue(cli, "ck_items", "it", 120, 0.05)
    a = spawn(**FAST)
    wait_until(lambda: r.llen("it") >= 40, 30, "progress")
    (key,) = r.keys(K.worker("*"))
    wait_until(lambda: r.hget(key, "ckpt:0") is not None, 5, "a checkpoint saved with a heartbeat")
    kill_tree(a)  # the dyno dies outright: no put-back, no cleanup
    done_before = len(items(r, "it"))
    wait_until(lambda: all_dead_expired(r), 10, "a's own deadline (1.5 s after its last beat)")
    b = spawn("--burst", **FAST)  # recovers a's job at start
    assert b.wait(60) == 0, b.output
    assert "event=recovery.requeued" in b.output, b.output
    done = items(r, "it")
    assert set(done) == set(range(120)), "an item was skipped"
    resumed_at = json.loads(r.lrange("it:runs", 0, -1)[-1])["at"]
    redone = done_before - resumed_at
    # a heartbeat (0.5 s) is 10 items of 50 ms; allow a second one for a loaded 2-core machine
    assert resumed_at > 0 and 0 <= redone <= 20, f"{redone} items redone (heartbeat 0.5 s = 10 items)"
    print(f"\nwhole-tree SIGKILL: {redone} items redone (HEARTBEAT_INTERVAL=0.5, 50 ms per item)")
    assert no_checkpoint_fields(r)


@pytest.mark.timeout(60)
def test_checkpoint_survives_the_term_timeout_kill_exactly(r, cli, spawn):
    """A job that ignores TermException is killed at the deadline: it goes back with the very last of 50,000
    checkpoints it recorded in a tight loop."""
    job_id = enqueue(cli, "ck_then_hang", "ready", 50_000)
    w = spawn(SHUTDOWN_WINDOW="4", TERM_TIMEOUT="1", **FAST)
    assert json.loads(r.blpop("ready", 30)[1])["resumed_from"] is None
    report = dyno.shutdown(w.pid, mode="parent", window=4)
    assert not report.sigkilled and w.wait(5) == 0, w.output
    assert "event=shutdown.child_killed" in w.output
    back = json.loads(r.lindex(K.queue("default"), 0))
    assert back["id"] == job_id and back["checkpoint"] == 49_999 and back["interruptions"] == 1
    assert "event=job.checkpointed" in w.output and "checkpoint=49999" in w.output
    w2 = spawn(**FAST)  # the next run sees it
    assert json.loads(r.blpop("ready", 30)[1])["resumed_from"] == 49_999
    w2.signal(signal.SIGTERM)


@pytest.mark.timeout(60)
def test_max_interruptions_sends_the_job_to_the_failed_registry(r, cli, spawn):
    job_id = "c" * 32  # already interrupted twice: the limit (@job(max_interruptions=2)) is reached at this stop
    r.rpush(K.queue("default"), json.dumps({"id": job_id, "name": "ck_limited", "queue": "default", "args": ["ready"],
                                            "kwargs": {}, "enqueued_at": time.time(), "attempts": 0,
                                            "interruptions": 2, "checkpoint": {"cursor": 2}}))
    w = spawn(**FAST)
    r.blpop("ready", 30)
    w.signal(signal.SIGTERM)
    assert w.wait(10) == 0, w.output
    assert r.llen(K.queue("default")) == 0
    rec = json.loads(r.hget(K.failed_data, job_id))
    assert rec["message"] == "interrupted 3 times without finishing; make it resumable or shorter"
    assert rec["checkpoint"] == {"cursor": 3} and rec["interruptions"] == 3
    shown = cli("failed", "show", job_id, JOB_MODULES=MODULES)
    assert shown.returncode == 0 and "cursor" in shown.stdout, shown.stdout + shown.stderr


@pytest.mark.timeout(60)
def test_max_interruptions_puts_the_job_back_up_to_the_limit_itself(r, cli, spawn):
    """Issue 27 item 13: the boundary. A ``max_interruptions=2`` job interrupted for the second time (2 of 2) is put
    back with its progress, not failed; only the third interruption fails it (the test above)."""
    job_id = "d" * 32  # interrupted once already: this stop is its second interruption
    r.rpush(K.queue("default"), json.dumps({"id": job_id, "name": "ck_limited", "queue": "default", "args": ["ready"],
                                            "kwargs": {}, "enqueued_at": time.time(), "attempts": 0,
                                            "interruptions": 1, "checkpoint": {"cursor": 1}}))
    w = spawn(**FAST)
    r.blpop("ready", 30)
    w.signal(signal.SIGTERM)
    assert w.wait(10) == 0, w.output
    assert "event=shutdown.job_put_back" in w.output and "event=job.failed" not in w.output, w.output
    assert r.hget(K.failed_data, job_id) is None
    back = json.loads(r.lindex(K.queue("default"), 0))
    assert back["id"] == job_id and back["interruptions"] == 2 and back["checkpoint"] == {"cursor": 2}, back


@pytest.mark.timeout(60)
def test_no_checkpoint_left_once_a_job_ends_and_status_shows_a_running_one(r, cli, spawn):
    w = spawn(HEARTBEAT_INTERVAL="0.2", HEARTBEAT_TTL="1", JOB_MODULES=MODULES, WORKER_CONCURRENCY="2")
    fail_id = enqueue(cli, "ck_then_fail", "failing")
    enqueue(cli, "ck_then_hang", "hanging", 3)
    r.blpop("failing", 30)
    r.blpop("hanging", 30)
    (key,) = r.keys(K.worker("*"))
    wait_until(lambda: sorted(f for f in r.hkeys(key) if f.startswith("ckpt:")) == ["ckpt:0", "ckpt:1"], 5,
               "both checkpoints saved")
    doc = json.loads(cli("status", "--json").stdout)
    assert sorted(json.dumps(s["checkpoint"]) for s in doc["workers"][0]["slots"]) == ["2", '{"at": 7}']
    r.rpush("failing:go", 1)
    wait_until(lambda: r.hget(K.failed_data, fail_id) is not None, 10, "the failure recorded")
    assert json.loads(r.hget(K.failed_data, fail_id))["checkpoint"] == {"at": 7}
    assert [f for f in r.hkeys(key) if f.startswith("ckpt:")] == [next(
        f"ckpt:{s['slot']}" for s in doc["workers"][0]["slots"] if s["checkpoint"] == 2)]
    w.signal(signal.SIGTERM)  # the hanging one is killed at the deadline and put back with its checkpoint
    assert w.wait(15) == 0, w.output
    assert json.loads(r.lindex(K.queue("default"), 0))["checkpoint"] == 2
    assert not r.exists(key)  # the worker's hash (and every ckpt field) went with its clean exit


@pytest.mark.timeout(60)
def test_a_retry_after_an_exception_resumes_from_the_failed_runs_checkpoint(r, cli, spawn):
    """A retry resumes where the failed run got to, as a put-back does; only a finished job discards its
    checkpoint (the user guide said a failing job discards it: settled on resuming, the review of issue 27)."""
    job_id = enqueue(cli, "ck_fail_once", "retried")
    w = spawn(**FAST)
    assert next_event(r, "retried")["resumed_from"] is None
    assert next_event(r, "retried", timeout=30)["resumed_from"] == 7  # after the retry's backoff (about 2 s)
    wait_until(lambda: r.hget(K.job(job_id), "status") == "done", 10, "the retry recorded as done")
    w.signal(signal.SIGTERM)
    assert w.wait(15) == 0, w.output


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("seed", [11, 23])
def test_chaos_with_resumable_jobs_skips_nothing(r, cli, spawn, seed):
    """Two workers (2 slots each) on four resumable jobs, while a seeded schedule stops them (Heroku-style) or kills
    their whole tree, and starts new ones; then a burst worker finishes. Every item of every job is done."""
    rng = random.Random(seed)
    jobs = {f"j{n}": 60 for n in range(4)}
    for key, n in jobs.items():
        enqueue(cli, "ck_items", key, n, 0.02)
    env = dict(FAST, WORKER_CONCURRENCY="2", SHUTDOWN_WINDOW="4")
    workers = [spawn(**env) for _ in range(2)]
    for _ in range(6):
        time.sleep(rng.uniform(0.3, 0.8))
        i = rng.randrange(len(workers))
        if rng.random() < 0.5:
            report = dyno.shutdown(workers[i].pid, mode="dyno", window=4)
            assert not report.sigkilled, f"seed {seed}: {workers[i].output}"
        else:
            kill_tree(workers[i])
        workers[i] = spawn(**env)
    for w in workers:
        dyno.shutdown(w.pid, mode="dyno", window=4)
    wait_until(lambda: all_dead_expired(r), 10, "killed workers past their deadlines")
    last = spawn("--burst", **env)
    assert last.wait(100) == 0, f"seed {seed}: {last.output}"
    for key, n in jobs.items():
        assert set(items(r, key)) == set(range(n)), f"seed {seed}: {key} skipped items"
    assert r.llen(K.queue("default")) == 0 and not r.keys(K.processing("*")), f"seed {seed}"


@pytest.mark.timeout(60)
def test_a_job_near_the_size_limit_is_resumed_with_a_large_checkpoint(r, spawn):
    """Issue 27 item 3: a payload near MAX_PAYLOAD_BYTES, put back by a stop with an allowed checkpoint, was refused
    at its next claim ("payload is N bytes, over MAX_PAYLOAD_BYTES"): the limit bounds what the producer sent, not
    what the runtime adds."""
    import worker.config
    from worker.fetch import Broker
    limit = 3000
    b = Broker(r, worker.config.from_mapping({"MAX_PAYLOAD_BYTES": str(limit)}))
    job_id = b.push("ck_big", ["ready", 2500, "p" * 2800], {}, queue="default")
    assert len(r.lindex(K.queue("default"), 0)) > limit - 100
    w = spawn(MAX_PAYLOAD_BYTES=str(limit), SHUTDOWN_WINDOW="4", **FAST)
    assert json.loads(r.blpop("ready", 30)[1])["resumed"] is None
    w.signal(signal.SIGTERM)
    assert w.wait(10) == 0, w.output
    back = r.lindex(K.queue("default"), 0)
    assert json.loads(back)["id"] == job_id and len(back) > limit
    w2 = spawn(MAX_PAYLOAD_BYTES=str(limit), **FAST)
    assert json.loads(r.blpop("ready", 30)[1])["resumed"] == 2500, w2.output
    assert "event=job.bad" not in w2.output
    w2.signal(signal.SIGTERM)


@pytest.mark.timeout(60)
def test_checkpoint_refuses_a_lone_surrogate_at_the_call(r, cli, spawn):
    """Issue 27 item 4: checkpoint() accepted a lone surrogate, and the job was then refused at its next claim (after
    a stop, or a whole-tree SIGKILL) instead of resumed. It is refused in checkpoint(), with a clear error."""
    enqueue(cli, "ck_surrogate", "said")
    w = spawn(**FAST)
    got = json.loads(r.blpop("said", 30)[1])
    assert got["event"] == "refused" and "lone surrogate" in got["message"], (got, w.output)
    w.signal(signal.SIGTERM)


# --- checkpoints the worker cannot decode, or from several threads ---

@pytest.mark.timeout(30)
def test_deeply_nested_checkpoint_does_not_kill_the_worker(r, spawn, enqueue):
    """Origin: core review (9a4b9fe), #2."""
    w = spawn(JOB_MODULES=MODULES, HEARTBEAT_INTERVAL=1)
    name = name_of(w)
    job_id = enqueue("ck_deep_checkpoint", "ev")
    assert next_event(r, "ev")["event"] == "checkpointed"
    # two heartbeats after the checkpoint: the worker has looked at it (progress() saves checkpoints at beats)
    t0 = redis_ms(r)
    wait_until(lambda: (heartbeat(r, name) or 0) >= t0 + 1500 or w.popen.poll() is not None, 10,
               "two heartbeats after the checkpoint")
    assert w.popen.poll() is None, f"the worker died on the checkpoint:\n{w.output}"
    r.rpush("ev:go", "1")
    assert next_event(r, "ev")["event"] == "finished"
    wait_until(lambda: status_of(r, job_id) in ("done", "failed"), 15, "the job recorded")
    wait_until(lambda: processing(r) == {}, 10, "the processing list emptied")
    still_works(r, w, enqueue, "deep-ckpt")


@pytest.mark.timeout(30)
def test_checkpoints_from_three_threads_keep_the_report_intact(r, spawn, enqueue):
    """Origin: core review (9a4b9fe), #6."""
    w = spawn(JOB_MODULES=MODULES)
    job_id = enqueue("ck_threaded_checkpoints", "ev")
    ev = next_event(r, "ev")
    assert ev["event"] == "finished" and ev["errors"] == [], ev
    line = w.wait_for(rf"event=job\.(done|failed|retry|bad) .*job={job_id}", 15)
    assert "event=job.done" in line, w.output
    wait_until(lambda: status_of(r, job_id) == "done", 10, "the job recorded done")
    assert processing(r) == {}
