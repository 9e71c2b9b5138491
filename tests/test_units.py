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
