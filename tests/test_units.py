"""Fast unit tests of pure logic, without Redis or forks: when a slot's job is over (report frames, exit status,
kills), what a child's run means (``policy.result_of``) and what is recorded for it (``policy.decide``).

The behaviour end to end (real children, real signals) is in the other suites; these pin the rules themselves.
"""
from __future__ import annotations

import json
import os
import signal

import pytest

from worker.child import _FRAME, _OK
from worker.claimed import ClaimedJob
from worker.fetch import Op
from worker.jobs import JobOptions
from worker.policy import Kill, Status, decide, result_of
from worker.slots import Slot


def frame(kind: bytes, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return _FRAME.pack(kind, len(data)) + data


def running_slot(*chunks: bytes) -> Slot:
    s = Slot(0)
    s.seq, s.child.pid = 7, 12345
    for chunk in chunks:
        s.out.buf += chunk
        s.out.frames()
    return s


# --- when a slot's job is over ---

def test_a_final_report_ends_the_job_before_the_exit_status():
    s = running_slot(frame(b"C", {"n": 1}), _OK)
    assert s.finished and s.child.status is None
    assert s.out.checkpoint == '{"n": 1}' and json.loads(s.out.report) == {"status": "ok"}


def test_a_report_split_across_reads_ends_the_job_only_when_whole():
    whole = frame(b"R", {"status": "error", "message": "boom"})
    s = running_slot(whole[:7])
    assert not s.finished
    s.out.buf += whole[7:]
    s.out.frames()
    assert s.finished


def test_an_interrupted_runs_report_waits_for_the_exit_status():
    """The job goes back to a queue where another worker may take it at once: its run, process group included,
    must be over first, and the fork server ends that group before it sends the exit status."""
    s = running_slot(frame(b"I", {"status": "interrupted"}))
    assert s.out.report and not s.finished
    s.child.status, s.out.eof = 0, True
    assert s.finished


def test_a_child_we_killed_is_over_when_it_has_exited_without_a_status():
    s = running_slot()
    s.child.exited_at = 1.0
    assert not s.finished  # exited on its own: how it died comes with the exit status
    s.killed = Kill.DEADLINE
    assert s.finished


def test_bytes_that_are_not_frames_are_ignored_not_taken_for_a_report():
    s = running_slot(b"hello from the job\n" + _OK)
    assert s.out.garbled and not s.out.report and not s.finished


# --- what a run means ---

def test_the_report_wins_over_the_exit_status_and_the_kill():
    r = result_of(b'{"status": "ok", "result": [1, 2]}', None, Kill.TIMEOUT, False, 5.0, 0, 0.1)
    assert r.status is Status.DONE and r.value == "[1,2]"


@pytest.mark.parametrize("killed,termed,status", [
    (Kill.DEADLINE, True, Status.INTERRUPTED),
    (Kill.TIMEOUT, False, Status.TIMEOUT),
    (Kill.TIMEOUT, True, Status.INTERRUPTED),
    (Kill.USR1, False, Status.KILLED),
    (Kill.MEMORY, False, Status.MEMORY),
    (Kill.FORKSERVER, False, Status.LOST),  # issue 27 item 7: a lost attempt, not a failure
    (Kill.FORKSERVER, True, Status.INTERRUPTED),  # the fork server died during a stop: put back, not a failure
])
def test_why_we_killed_it_says_what_it_was(killed, termed, status):
    assert result_of(b"", None, killed, termed, 5.0, 100, 0.1).status is status


def test_a_death_without_report_is_described_by_its_status():
    r = result_of(b"", signal.SIGSEGV, None, False, 0.0, 0, 0.1)
    assert r.status is Status.CRASH and r.message == "child killed by SIGSEGV"
    r = result_of(b"", 3 << 8, None, False, 0.0, 0, 0.1)
    assert r.message == "child exited with code 3 without reporting"
    assert os.WIFEXITED(3 << 8)


def test_an_unreadable_report_without_status_is_a_crash_that_says_so():
    r = result_of(b"{not json", None, None, False, 0.0, 0, 0.1)
    assert r.status is Status.CRASH and r.message == "its final report could not be read"


# --- what is recorded ---

DOC = {"id": "j1", "name": "push", "args": [], "kwargs": {}, "queue": "default"}
RAW = json.dumps(DOC)


def claimed(raw=RAW, doc=DOC, retries=0) -> ClaimedJob:
    return ClaimedJob(raw, doc, "default", 0, 0, JobOptions(retries=retries))


def test_done_is_acknowledged_with_its_result():
    r = result_of(b'{"status": "ok", "result": {"a": 1}}', None, None, False, 0.0, 0, 0.2)
    d = decide(r, claimed(), "w")
    assert d.outcome.op is Op.ACK and d.outcome.result == '{"a":1}' and d.event == "job.done"


def test_an_error_is_retried_while_retries_remain_then_failed():
    r = result_of(b'{"status": "error", "type": "ValueError", "message": "boom"}', 256, None, False, 0.0, 0, 0.2)
    d = decide(r, claimed(retries=1), "w")
    assert d.outcome.op is Op.RETRY and json.loads(d.outcome.new_payload)["attempts"] == 1
    again = dict(DOC, attempts=1)
    d = decide(r, claimed(json.dumps(again), again, retries=1), "w")
    assert d.outcome.op is Op.FAIL and d.event == "job.failed"


def test_an_interruption_is_put_back_with_its_checkpoint_and_not_counted_as_an_attempt():
    r = result_of(b'{"status": "interrupted"}', 0, None, True, 0.0, 0, 0.2)
    d = decide(r, claimed(), "w", checkpoint='{"row": 40}')
    new = json.loads(d.outcome.new_payload)
    assert d.outcome.op is Op.REQUEUE and d.event == "shutdown.job_put_back"
    assert new["checkpoint"] == {"row": 40} and new["interruptions"] == 1 and "attempts" not in new


# --- children still exiting after their report (SlotTable bookkeeping) ---

def test_a_report_before_the_pid_is_tracked_until_the_exit_status():
    """A short job's report can reach the worker before the fork server's pid frame: the exiting child is still
    remembered (its process group is ended if the fork server fails before reaping it), and forgotten at its exit."""
    import time

    from worker.config import from_mapping
    from worker.signals import SignalState
    from worker.slots import SlotTable

    t = SlotTable(from_mapping({"REDIS_URL": "redis://localhost:6379/0", "WORKER_CONCURRENCY": "2"}),
                  SignalState(hard_exit_after=9.5, grace=0.0), log=None)
    s = t.slots[1]
    s.seq, s.started = 5, time.monotonic()
    s.out.buf += _OK
    s.out.frames()
    assert t.collect() == [s] and t.exiting == {5: 0}
    s.clear()
    t._frame(b"P", 5, 4242)  # the pid of a job already recorded
    assert t.exiting == {5: 4242} and 4242 in t.sig.child_pids
    t._frame(b"S", 5, 0)  # reaped (and its group ended) by the fork server
    assert t.exiting == {} and 4242 not in t.sig.child_pids


def test_a_worker_that_leaves_with_frames_unread_is_end_of_file_for_the_fork_server():
    """The worker closes its socket without reading the last exit statuses (it records jobs from their reports): the
    fork server's next read is a connection reset, which must end it quietly, not with a traceback in the logs."""
    import socket

    from worker.forkserver import FRAME, _recv_job

    server, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server.sendall(FRAME.pack(b"S", 1, 0))  # an exit status the worker never reads
    worker_end.close()
    try:
        assert _recv_job(server) is None
    finally:
        server.close()


# --- one claimed job, its options resolved once (issue 22 point 1) ---

def _cfg(**env):
    from worker.config import from_mapping
    return from_mapping({"REDIS_URL": "redis://localhost:6379/0", **env})


def test_every_job_option_is_resolved_once_from_the_job_else_the_config():
    """Issue 22 point 1: a claim becomes a job in one place, every option resolved there (the job's @job value, a 0
    included, else its Config default); nothing downstream defaults one (``result_ttl`` travelled as None until the
    Redis call's arguments)."""
    import dataclasses

    cfg = _cfg(JOB_TIMEOUT="7", JOB_RETRIES="2", MAX_INTERRUPTIONS="4", RESULT_TTL="60", MAX_ATTEMPTS="3")
    declared = {"queue": "default", "timeout": None, "retries": 5, "max_interruptions": None, "result_ttl": 0}
    job = ClaimedJob.of(RAW, DOC, "default", 1, 123, declared, cfg)
    assert job.options == JobOptions(timeout=7.0, retries=5, max_interruptions=4, result_ttl=0, max_attempts=3)
    assert None not in dataclasses.astuple(job.options)
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.options.retries = 9  # type: ignore[misc]


def test_what_the_fork_server_sends_declares_every_job_option():
    """``jobs.meta()`` goes by the fields of ``JobOptions``: an option declared in @job reaches the supervisor."""
    import dataclasses

    from worker import jobs
    jobs.job(name="units_options_probe", max_interruptions=2, result_ttl=5)(lambda: None)
    try:
        entry = jobs.meta()["units_options_probe"]
    finally:
        jobs._REGISTRY.pop("units_options_probe")
    assert {f.name for f in dataclasses.fields(JobOptions)} <= set(entry)
    assert (entry["max_interruptions"], entry["result_ttl"], entry["timeout"]) == (2, 5, None)


def test_a_done_job_is_kept_for_its_own_ttl_and_carries_its_claim_time():
    r = result_of(b'{"status": "ok"}', None, None, False, 0.0, 0, 0.1)
    job = ClaimedJob(RAW, DOC, "default", 2, 1234, JobOptions(result_ttl=60))
    o = decide(r, job, "w").outcome
    assert (o.keep_ms, o.started_ms, o.slot) == (60000, 1234, 2)


def test_the_interruption_limit_is_the_jobs_resolved_option():
    r = result_of(b'{"status": "interrupted"}', 0, None, True, 0.0, 0, 0.2)
    doc = dict(DOC, interruptions=2)
    d = decide(r, ClaimedJob(json.dumps(doc), doc, "default", 0, 0, JobOptions(max_interruptions=2)), "w")
    assert d.outcome.op is Op.FAIL and d.fields["interruptions"] == 3
    d = decide(r, ClaimedJob(json.dumps(doc), doc, "default", 0, 0, JobOptions(max_interruptions=3)), "w",
               elapsed=1.5)
    assert d.outcome.op is Op.REQUEUE and d.fields["elapsed"] == 1.5


# --- the stop timeline, one table of steps (issue 22 point 2) ---

@pytest.mark.timeout(30)
def test_the_stop_timeline_takes_each_step_at_its_time_and_says_when_the_next_one_is():
    """``SlotTable.service`` and ``due`` both follow ``stops.STEPS``: TERM at the stop, RAISE at TERM_GRACE, the kill
    at TERM_GRACE + TERM_TIMEOUT; a child killed for another reason first gets no deadline kill."""
    import io
    import subprocess
    import time

    from worker.log import Logger
    from worker.signals import SignalState
    from worker.slots import SlotTable
    from worker.stops import Stage

    t = SlotTable(_cfg(TERM_GRACE="0.8", TERM_TIMEOUT="5"), SignalState(hard_exit_after=9.5, grace=0.8),
                  Logger(stream=io.StringIO()))
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)  # a process group of its own, as a job's
    try:
        s = t.slots[0]
        now = time.monotonic()
        s.seq, s.started, s.job, s.child.pid = 1, now, claimed(), child.pid
        t.sig.stop_at = now - 0.5
        t.service()
        assert s.stage is Stage.TERMED and s.killed is None
        assert 0.1 < t.due() <= 0.3  # RAISE at stop + 0.8
        t.sig.stop_at = now - 5.5
        t.service()
        assert s.stage is Stage.RAISED and s.killed is None
        assert 0.1 < t.due() <= 0.3  # the kill at stop + 5.8
        t.sig.stop_at = now - 6.0
        t.service()
        assert s.stage is Stage.KILLED and s.killed is Kill.DEADLINE and s.termed
        assert t.due() > 0.9  # nothing more to do for it
        assert child.wait(10) != 0
        s.clear()
        child = subprocess.Popen(["sleep", "30"], start_new_session=True)  # (never signal a reaped pid)
        s.seq, s.started, s.job, s.child.pid, s.killed = 2, now, claimed(), child.pid, Kill.TIMEOUT
        t.sig.stop_at = now - 5.5
        t.service()
        assert s.stage is Stage.RAISED and t.due() > 0.9  # killed already: no deadline step to wait for
        t.sig.stop_at = now - 6.0
        t.service()
        assert s.killed is Kill.TIMEOUT
    finally:
        child.kill()
        child.wait()
