"""One slot of the table (``slots.py``), split by concern: the job it runs (``claimed.ClaimedJob``), the child
process that runs it (:class:`Child`), the reader of that child's report pipe (:class:`Report`), and how far the
worker went in stopping it (``stops.Stage``, with ``Kill``: why the worker killed it, if it did)."""
from __future__ import annotations

import os
import signal
import time
from enum import Enum
from typing import Optional

from . import protocol
from .claimed import ClaimedJob
from .policy import Kill, Result, Status, result_of
from .signals import kill_job
from .stops import Stage

EXIT_WAIT = 0.25        # a killed child seen exiting (pidfd) is written off after this long without its S frame


class Report:
    """The child's report pipe, read without blocking: its checkpoints and its final report (frames: kind, 4-byte
    length, JSON)."""

    def __init__(self, fd: int = -1):
        self.fd = fd
        self.buf = bytearray()               # unparsed bytes
        self.report = b""                    # the child's final report (JSON), if it sent one
        self.interrupted = False             # ... and it says the run was interrupted (see Slot.finished)
        self.checkpoint: Optional[str] = None  # the last checkpoint it sent (JSON text)
        self.eof = False
        self.garbled = False                 # the pipe carried something that is not our frames

    def read(self) -> None:
        try:
            while True:
                data = os.read(self.fd, 65536)
                if not data:
                    self.eof = True
                    break
                self.buf += data
        except BlockingIOError:
            pass
        self.frames()

    def frames(self) -> None:
        """Take the complete frames out of the buffer: checkpoints and the report."""
        if self.garbled:
            self.buf.clear()
            return
        buf, at = self.buf, 0
        while True:
            try:
                frame = protocol.decode_report(buf, at)
            except protocol.Garbled:  # not ours (the job wrote on the fd): ignore the rest
                self.garbled = True
                buf.clear()
                return
            if frame is None:
                break
            kind, body, at = frame
            if kind == protocol.CHECKPOINT:
                self.checkpoint = body.decode("utf-8", "replace")
            else:
                self.report = body
                self.interrupted = kind == protocol.INTERRUPTED
        del buf[:at]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Child:
    """The job's child process, as the fork server reports it and as the worker watches it."""

    def __init__(self):
        self.pid = 0                         # 0 until the fork server says
        self.pidfd = -1                      # the worker's own watch on it (it is the fork server's child)
        self.exited_at = 0.0                 # when that watch saw it exit (monotonic), while the server says nothing
        self.status: Optional[int] = None    # wait status from the fork server

    def watch(self, pid: int) -> None:
        self.pid = pid
        try:  # a stalled fork server cannot hide a child's end from us: we watch it too
            self.pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self.pidfd = -1  # gone already (its S frame follows), or no pidfds here

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class Listing(Enum):
    """Whether our processing list still holds the slot's claim."""

    HELD = "held"
    MISSING = "missing"  # gone without a recovery (a failover, eviction): the job runs on, its outcome finds no claim
    LOST = "lost"        # another worker recovered it: killed, and nothing is recorded


class Slot:
    """One job in flight (``busy``: a ``seq`` is set) and everything the worker knows of it."""

    def __init__(self, index: int):
        self.index = index
        self.child = Child()
        self.clear()

    def clear(self) -> None:
        self.child.close()
        self.seq = 0                         # this run's number on the fork server's socket
        self.job: Optional[ClaimedJob] = None
        self.started = 0.0                   # when it was handed to the fork server (monotonic)
        self.unstarted = False               # the fork server failed before this job reached a child
        self.child = Child()
        self.out = Report()
        self.saved: Optional[str] = None     # the checkpoint last written to Redis (for a dyno killed outright)
        self.stage = Stage.RUNNING           # how far the stop timeline went for it (stops.py)
        self.killed: Optional[Kill] = None   # why the worker killed it (the first reason only)
        self.canceled_at: Optional[float] = None  # cancel(running=True) asked to stop it then (monotonic)
        self.listing = Listing.HELD

    @property
    def busy(self) -> bool:
        return self.seq != 0

    @property
    def lost(self) -> bool:
        return self.listing is Listing.LOST

    @property
    def unlisted(self) -> bool:
        return self.listing is not Listing.HELD

    @property
    def termed(self) -> bool:
        return self.stage >= Stage.TERMED

    @property
    def finished(self) -> bool:
        """The job's run is over, and the slot can be recorded and reused:

        * its child sent its final report; it then only flushes the job's output and exits (the fork server reaps
          it, and ends whatever it left running, on its own). Not waiting for the exit status takes the child's
          exit, the reap and a wake-up of the worker off every job's path. Except an interrupted run's report:
          that job goes back to the head of a queue, where another worker may take it at once, so it waits for the
          exit status, which the fork server sends after it has ended the run's process group: two runs never
          overlap;
        * or it was reaped (exit status in, pipe drained) without a report;
        * or the worker killed it and saw it exit (pidfd) ``EXIT_WAIT`` s ago without the fork server's word: how
          it died is the worker's to say, so a stalled fork server cannot hold a killed job back from being put back
          (a healthy one reports first: its ``S`` frame comes after it has ended what the run left in other
          sessions, ``orphans.py``, so a put-back job never runs beside its previous run's helpers);
        * or it never reached a child.
        """
        out, child = self.out, self.child
        return self.busy and ((bool(out.report) and not out.interrupted) or self.unstarted
                              or (child.status is not None and out.eof)
                              or (self.killed is not None and bool(child.exited_at)
                                  and time.monotonic() - child.exited_at >= EXIT_WAIT))

    def kill(self, why: Kill) -> None:
        if self.killed is None:
            self.killed = why
            if self.child.pid:
                kill_job(self.child.pid, signal.SIGKILL)

    def result(self, limit_mb: int) -> Result:
        duration = time.monotonic() - self.started
        res = result_of(self.out.report, self.child.status, self.killed, self.termed, self.job.options.timeout,
                        limit_mb, duration)
        if self.canceled_at is not None and res.status is not Status.DONE:  # canceled, not put back nor retried
            return Result(Status.CANCELED, duration, res.type, res.message or "canceled", res.traceback)
        return res


def private_mb(pid: int) -> float:
    """Memory of ``pid`` that is its own (private pages: what the job allocated or wrote), not the app's pages it
    shares copy-on-write with the fork server. 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            total = 0
            for line in f:
                if line.startswith(b"Private_"):
                    total += int(line.split()[1])
            return total / 1024.0
    except (OSError, ValueError, IndexError):
        return 0.0


def job_private_mb(pid: int) -> float:
    """:func:`private_mb` of a job's child and every process below it (what it started: a converter, a shell
    pipeline), found through /proc/<pid>/task/<tid>/children; a process that left the tree (daemonised) is not
    counted, but dies with the job's process group at its end."""
    total, todo, seen = 0.0, [pid], set()
    while todo and len(seen) < 4096:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += private_mb(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children", "rb") as f:
                    todo.extend(int(x) for x in f.read().split())
        except (OSError, ValueError):
            pass
    return total
