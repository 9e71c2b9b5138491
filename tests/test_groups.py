"""Groups with an exactly-once completion callback (issue 25 item 4): ``group([f.call(...), ...],
on_complete=g.call(...)).enqueue()``. A member's end (done, failed for good, canceled, written off by recovery) is
counted in the same script call that records it, once (HSETNX of its id into the group's results); the call that
records the last member queues the callback, which gets ``results=`` in member order (worker/groups.py)."""
import json
import signal
import time

import pytest

from tests.support import wait_until
from worker import cancel, get_group, group, jobs, testing
from worker.keys import Keys
from worker.results import get_job

MODULES = "worker.sample,tests.jobs,tests.jobs_groups"
K = Keys()
FAST = {"HEARTBEAT_INTERVAL": "0.5", "HEARTBEAT_TTL": "2", "JOB_MODULES": MODULES}


@pytest.fixture
def gj(r, module_broker):
    import tests.jobs_groups as gj
    module_broker(MODULES)
    return gj


def reports(r, key) -> list:
    return [json.loads(x) for x in r.lrange(key + ":report", 0, -1)]


def wait_report(r, key, n=1, timeout=30.0) -> list:
    wait_until(lambda: r.llen(key + ":report") >= n, timeout, f"{n} callback run(s) of {key}")
    return reports(r, key)


def settled(r, gid, timeout=20.0) -> dict:
    """get_group once its callback has ended (done or failed)."""
    wait_until(lambda: (get_group(gid) or {}).get("callback", {}).get("status") in ("done", "failed"), timeout,
               f"group {gid}'s callback ended")
    return get_group(gid)


@pytest.mark.timeout(60)
def test_the_callback_runs_once_with_the_results_in_member_order(r, gj, spawn):
    gid = group([gj.g_send.call("h", n) for n in range(5)], on_complete=gj.g_report.call("h", label="L")).enqueue()
    g = get_group(gid)
    assert (g["total"], g["pending"], g["done"], g["callback"]["status"]) == (5, 5, 0, "waiting")
    member_ids = r.lrange(K.group_ids(gid), 0, -1)
    assert [get_job(i).status for i in member_ids] == ["queued"] * 5
    w = spawn(JOB_MODULES=MODULES, WORKER_CONCURRENCY="3")
    (rep,) = wait_report(r, "h")
    assert rep["label"] == "L"
    assert [x["id"] for x in rep["results"]] == member_ids
    assert [(x["status"], x["result"], x["error"]) for x in rep["results"]] == [("done", n * 10, None)
                                                                               for n in range(5)]
    g = settled(r, gid)
    assert (g["total"], g["done"], g["failed"], g["canceled"], g["pending"]) == (5, 5, 0, 0, 0)
    assert g["callback"]["status"] == "done" and get_job(g["callback"]["id"]).result == 5
    assert g["completed_at"] >= g["created_at"] > 0
    # the group's keys now expire with the callback's status record (RESULT_TTL of g_report: 600 s)
    for key in (K.group(gid), K.group_ids(gid), K.group_res(gid)):
        assert 0 < r.pttl(key) <= 600_000, key
    w.signal(signal.SIGTERM)
    assert w.wait(15) == 0
    assert len(reports(r, "h")) == 1
