"""Chaos: three real workers process a few hundred short jobs while a seeded random schedule SIGTERMs them
(gracefully: the parent only as foreman does, or the whole process group as Heroku does) and SIGKILLs whole trees
(a dyno crash), restarting each one at once. At the end every job completed at least once, nothing is left in a
processing list, nothing is lost. Duplicates (a job killed after its work, before its ack) are allowed and counted.

The schedules are a fixed set, so a failure in CI reproduces: one run with one job per worker, one with
``WORKER_CONCURRENCY=3`` (issue 9: several jobs in flight per worker, each killed or stopped with the others).
``CHAOS_SEED`` replays one schedule instead of the set's (every failure message names its seed); ``CHAOS_JOBS`` and
``CHAOS_SECONDS`` size the run.
"""
from __future__ import annotations

import os
import random
import re
import signal
import time

import pytest

from tests.support import keys_of, new_broker
from worker.failed import FailedRegistry

pytestmark = [pytest.mark.slow, pytest.mark.both_backends]  # on the single redis-server and the local cluster

MODULES = "worker.sample,tests.jobs,tests.jobs_chaos"
ENV = {"JOB_MODULES": MODULES, "HEARTBEAT_INTERVAL": "0.5", "HEARTBEAT_TTL": "2", "SHUTDOWN_WINDOW": "4",
       "LOG_LEVEL": "INFO"}
KEY = "{chaos}"  # the job's two keys in one slot on the cluster run (tests/jobs_chaos.py nl_chaos: one script)


def in_flight(r) -> dict:
    return {key: r.llen(key) for key in r.keys(keys_of(r).processing("*")) if r.llen(key)}


# (seed, WORKER_CONCURRENCY): fixed, so CI runs the same schedules every time
SCHEDULES = [pytest.param(20150, 1, id="seed20150-c1"), pytest.param(90115, 3, id="seed90115-c3")]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed,concurrency", SCHEDULES)
@pytest.mark.cluster_subset("seed90115-c3", reason="one schedule on the cluster (35 s each): the one with 3 jobs in "
                                                    "flight per worker")
def test_chaos_nothing_lost(r, k, spawn, seed, concurrency):
    seed = int(os.environ.get("CHAOS_SEED") or seed)
    n_jobs = int(os.environ.get("CHAOS_JOBS", "300"))
    chaos_seconds = float(os.environ.get("CHAOS_SECONDS", "20"))
    rng = random.Random(seed)
    env = dict(ENV, WORKER_CONCURRENCY=str(concurrency))
    print(f"\nchaos: seed={seed} concurrency={concurrency} (CHAOS_SEED={seed} to replay the schedule)")
    broker = new_broker(r)
    ids = [f"c{i}" for i in range(n_jobs)]
    calls = [([KEY, jid, rng.choice([0.01, 0.02, 0.05, 0.1, 0.2, 0.4])], {}) for jid in ids]
    broker.push_many("nl_chaos", calls[:n_jobs // 2])
    later = calls[n_jobs // 2:]  # the rest arrives while the chaos runs (a stream, not only a backlog)

    slots = [spawn(**env) for _ in range(3)]
    termed, kills, terms = [], 0, 0
    started = time.monotonic()
    while time.monotonic() - started < chaos_seconds:
        time.sleep(rng.uniform(0.3, 1.2))  # the chaos schedule itself, not a synchronisation
        if later:
            broker.push_many("nl_chaos", later[:30])
            later = later[30:]
        elif r.scard(KEY + ":done") == n_jobs:
            break
        i = rng.randrange(len(slots))
        action = rng.choice(["kill", "kill", "term_parent", "term_group"])
        victim = slots[i]
        if action == "kill":
            victim.kill_tree()  # dyno crash: no handler runs, the job stays in its processing list
            kills += 1
        else:
            try:
                if action == "term_group":  # Heroku: every process of the dyno
                    os.killpg(victim.pid, signal.SIGTERM)
                else:  # foreman: the direct child only
                    victim.signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            termed.append(victim)
            terms += 1
        slots[i] = spawn(**env)  # the replacement dyno starts at once
    if later:
        broker.push_many("nl_chaos", later)

    deadline = time.monotonic() + 90
    while not (r.scard(KEY + ":done") == n_jobs and r.llen(k.queue("default")) == 0
               and r.zcard(k.scheduled) == 0 and in_flight(r) == {}):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)

    done = r.smembers(KEY + ":done")
    runs = r.lrange(KEY + ":runs", 0, -1)
    failed = set(FailedRegistry(broker).ids())
    lost = [jid for jid in ids if jid not in done]
    duplicates = len(runs) - len(set(runs))
    print(f"chaos: {n_jobs} jobs, {kills} SIGKILLs, {terms} SIGTERMs, {duplicates} ran twice, "
          f"{len(failed)} in failed registry, lost={len(lost)}, {time.monotonic() - started:.1f}s")
    assert lost == [], (f"seed {seed} (concurrency {concurrency}): {len(lost)} jobs never completed: "
                        f"{lost[:20]}; in flight: {in_flight(r)}; queued: {r.llen(k.queue('default'))}")
    assert in_flight(r) == {} and r.llen(k.queue("default")) == 0 and r.zcard(k.scheduled) == 0, \
        f"seed {seed}: left in flight {in_flight(r)}"
    assert set(runs) == set(ids), f"seed {seed}"
    assert failed == set(), f"seed {seed}: a job ended failed (it was lost MAX_ATTEMPTS times?)"
    for w in slots:
        assert w.popen.poll() is None, f"seed {seed}: a worker died on its own:\n{w.output}"
    for w in termed:  # every graceful stop ended with exit 0 inside the 4 s window
        code = w.wait(10)
        if "event=worker.start" not in w.output and code == -signal.SIGTERM:
            continue  # signalled while still importing, before it had handlers or had claimed anything
        exits = re.findall(r"event=worker\.exit .*?elapsed=([0-9.]+)", w.output)
        assert code == 0, f"seed {seed}: SIGTERMed worker exited {code}:\n{w.output}"
        assert exits and float(exits[-1]) < 4.0, f"seed {seed}:\n{w.output}"
    broker.r.close()
