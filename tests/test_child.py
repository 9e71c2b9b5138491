"""The job's own process (worker/child.py): whatever it returns, writes to its report pipe or leaves behind, the
worker records the job from its report, once, and goes on; nothing the job started outlives it.

Its checkpoints are in tests/test_checkpoint.py; the fork server that starts it in tests/test_forkserver.py.
"""
from __future__ import annotations

import json
import os
import re
import signal

import pytest

import tests.jobs  # noqa: F401  (registers the jobs for Broker.push)
from tests.dyno import alive
from tests.support import next_event, pop, processing, status_of, still_works, wait_until

MODULES = "worker.sample,tests.jobs"


# --- the report: whatever the job returns or writes, the worker goes on ---

@pytest.mark.timeout(30)
def test_deeply_nested_return_value_does_not_kill_the_worker(r, spawn, enqueue):
    """Origin: core review (9a4b9fe), #2."""
    w = spawn(JOB_MODULES=MODULES)
    job_id = enqueue("deep_return", "ev")
    assert next_event(r, "ev")["event"] == "started"
    wait_until(lambda: status_of(r, job_id) in ("done", "failed"), 15, "the deep return recorded")
    wait_until(lambda: processing(r) == {}, 10, "the processing list emptied")
    still_works(r, w, enqueue, "deep-return")


@pytest.mark.timeout(30)
def test_forged_report_frame_does_not_kill_the_worker(r, spawn, enqueue):
    """Origin: core review (9a4b9fe), #2."""
    w = spawn(JOB_MODULES=MODULES)
    job_id = enqueue("forged_report", "ev")
    assert next_event(r, "ev")["event"] == "started"
    wait_until(lambda: status_of(r, job_id) in ("done", "failed") or w.popen.poll() is not None, 15,
               "the forged report recorded")
    assert w.popen.poll() is None, f"the worker died on the forged report:\n{w.output}"
    wait_until(lambda: processing(r) == {}, 10, "the processing list emptied")
    still_works(r, w, enqueue, "forged")
    assert r.hget("worker:failed:data", job_id) is not None, "recorded as failed, with a record"


@pytest.mark.timeout(45)
@pytest.mark.parametrize("how", ["exit", "return"])
def test_a_process_the_job_forked_cannot_end_the_job_with_a_report_of_its_own(r, spawn, enqueue, how):
    """A helper the job forks shares the report pipe; leaving through the runtime, it must not report: the job is
    recorded from its own process's report, once, after its whole run (no retry, no second run at once).

    Origin: review of "a job ends with its report" (7c27727/d05c0b1)."""
    job_id = enqueue("forks_a_helper", "ev", 1.0, how)
    w = spawn(JOB_MODULES=MODULES, JOB_RETRIES=3)
    line = w.wait_for(rf"event=job\.(done|retry|failed) .*job={job_id}", timeout=20)
    assert "event=job.done" in line and float(re.search(r"duration=([\d.]+)", line).group(1)) >= 1.0, w.output
    # the log line comes first; the status record with the worker's next Redis call
    wait_until(lambda: r.hget(f"worker:job:{job_id}", "result") == '"parent"', 5, "the job's own result recorded")
    assert [json.loads(x)["event"] for x in r.lrange("ev", 0, -1)] == ["start", "end"]


@pytest.mark.timeout(45)
def test_a_job_that_did_its_work_is_done_even_if_flushing_its_output_blocks(r, spawn, enqueue):
    """The report comes before the flush: the job is done, not timed out and retried; and the stuck child does not
    live on for ever (FLUSH_LIMIT, then SIGALRM; the fork server then ends its process group).

    Origin: review of "a job ends with its report" (7c27727/d05c0b1)."""
    from worker.child import FLUSH_LIMIT
    job_id = enqueue("hanging_flush", "ev")
    w = spawn(JOB_MODULES=MODULES, JOB_TIMEOUT=2, JOB_RETRIES=1)
    ev = next_event(r, "ev")
    assert ev["event"] == "work-done"
    line = w.wait_for(rf"event=job\.(done|retry|failed) .*job={job_id}", timeout=10)
    assert "event=job.done" in line, w.output
    wait_until(lambda: not alive(ev["pid"]), FLUSH_LIMIT + 3, "the child stuck in its flush ended")



# --- what the job leaves behind ---

@pytest.mark.timeout(30)
def test_subprocess_left_by_a_job_that_returns_is_gone_once_the_job_is_done(r, spawn, enqueue):
    """Origin: core review (9a4b9fe), #7."""
    w = spawn(JOB_MODULES=MODULES)
    job_id = enqueue("leaves_a_sleep", "pid")
    pid = int(pop(r, "pid", 15))
    try:
        w.wait_for(rf"event=job\.done .*job={job_id}", timeout=15)
        wait_until(lambda: not alive(pid), 3, f"the job's sleep (pid {pid}) to be gone")
    finally:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"sleep" in f.read():
                    os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
