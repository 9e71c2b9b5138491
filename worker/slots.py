"""The slot table: up to ``WORKER_CONCURRENCY`` job children at once, each supervised to the end (Sidekiq's
manager and processors, one fresh fork per job).

The table never waits and never touches Redis. The supervisor's loop selects on :meth:`SlotTable.fds`, then calls
:meth:`SlotTable.service` (signals and kills, derived from the clock) and :meth:`SlotTable.collect` (finished
children). Every stage of a shutdown is derived from one moment, the first TERM/INT, and applies to every running
slot at once::

    stop_at                       SIGTERM to each child (so foreman's parent-only TERM equals Heroku's)
    stop_at + TERM_GRACE          RAISE signal: TermException in each job
    stop_at + GRACE + TIMEOUT     SIGKILL to each child's process group: the job is put back at the head of its queue

Kills go to the child's process group, so what a job started dies with it.
"""
from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import time
from typing import Optional

from . import orphans, protocol
from .forkserver import ForkServer, ForkServerError
from .policy import Kill, Result, result_of
from .signals import RAISE_SIGNAL, kill_job

SPAWN_TIMEOUT = 10.0    # a fork server that has not handed a job to a child by then is wedged: replaced
REAP_TIMEOUT = 10.0     # ... or that has not reported a child's exit this long after it exited
EXIT_WAIT = 0.25        # a killed child seen exiting (pidfd) is written off after this long without its S frame
START_TIMEOUT = 120.0   # importing the app (Django set-up and the like) may take this long
MEMORY_POLL = 0.25      # how often a child's memory is read when JOB_MAX_MEMORY_MB is set
_PAGE = os.sysconf("SC_PAGE_SIZE")


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


class Slot:
    """One job in flight: claimed payload, child pid (0 until the fork server says), report pipe, kill state."""

    def __init__(self, index: int):
        self.index = index
        self.clear()

    def clear(self) -> None:
        if getattr(self, "pidfd", -1) >= 0:
            os.close(self.pidfd)
        self.pidfd = -1                      # the worker's own watch on the child (it is the fork server's child)
        self.exited_at = 0.0                 # when that watch saw it exit (monotonic), while the server says nothing
        self.seq = 0
        self.raw = ""
        self.claimed_ms = 0                  # when Redis handed it over (ms, its clock): the job's started_at
        self.doc: dict = {}
        self.queue = ""
        self.timeout = 0.0
        self.retries = 0
        self.max_interruptions = 0
        self.result_ttl: Optional[float] = None
        self.pid = 0
        self.r = -1
        self.buf = bytearray()               # unparsed bytes of the report pipe
        self.report = b""                    # the child's final report (JSON), if it sent one
        self.interrupted = False             # ... and it says the run was interrupted (see finished)
        self.checkpoint: Optional[str] = None  # the last checkpoint it sent (JSON text)
        self.saved: Optional[str] = None     # the checkpoint last written to Redis (for a dyno killed outright)
        self.eof = False
        self.garbled = False                 # the report pipe carried something that is not our frames
        self.status: Optional[int] = None   # wait status from the fork server
        self.killed: Optional[Kill] = None
        self.lost = False                   # another worker recovered its claim: killed, and nothing is recorded
        self.unlisted = False               # its claim is gone from our processing list (lost, or recovered)
        self.termed = self.raised = False
        self.started = 0.0
        self.unstarted = False              # the fork server failed before this job reached a child

    @property
    def busy(self) -> bool:
        return self.seq != 0

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
        return self.busy and ((bool(self.report) and not self.interrupted) or self.unstarted
                              or (self.status is not None and self.eof)
                              or (self.killed is not None and bool(self.exited_at)
                                  and time.monotonic() - self.exited_at >= EXIT_WAIT))

    def read(self) -> None:
        try:
            while True:
                data = os.read(self.r, 65536)
                if not data:
                    self.eof = True
                    break
                self.buf += data
        except BlockingIOError:
            pass
        self._frames()

    def _frames(self) -> None:
        """Take the complete frames (kind, 4-byte length, JSON) out of the buffer: checkpoints and the report."""
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

    def kill(self, why: Kill) -> None:
        if self.killed is None:
            self.killed = why
            if self.pid:
                kill_job(self.pid, signal.SIGKILL)

    def result(self, limit_mb: int) -> Result:
        duration = time.monotonic() - self.started
        return result_of(self.report, self.status, self.killed, self.termed, self.timeout, limit_mb, duration)


class SlotTable:
    def __init__(self, cfg, sig, log):
        self.cfg, self.sig, self.log = cfg, sig, log
        self.forks = ForkServer(cfg)
        self.slots = [Slot(i) for i in range(cfg.concurrency)]
        self._seq = 0
        self._started_at = 0.0       # when the current fork server was started (monotonic)
        self._next_memory = 0.0
        self.restarts = 0
        self.exiting: dict = {}      # seq -> pid: job recorded from its report, exit not yet reported by the server
        self.broken: Optional[str] = None  # set when the fork server cannot be brought back

    # --- the fork server ---
    def start_server(self) -> None:
        self.forks.start()
        self._started_at = time.monotonic()

    @property
    def ready(self) -> bool:
        return self.forks.ready

    @property
    def meta(self) -> dict:
        return self.forks.meta or {}

    def server_late(self) -> bool:
        return not self.forks.ready and time.monotonic() - self._started_at > START_TIMEOUT

    # --- slots ---
    def free(self) -> list:
        return [s.index for s in self.slots if not s.busy] if self.forks.ready else []

    def busy(self) -> int:
        return sum(1 for s in self.slots if s.busy)

    def unlisted(self) -> int:
        """Busy slots whose claim our processing list no longer holds (recovered by another worker: being killed;
        or lost by Redis: running on)."""
        return sum(1 for s in self.slots if s.busy and s.unlisted)

    def start(self, index: int, raw: str, doc: dict, queue: str, timeout: float, retries: int,
              max_interruptions: int = 0, result_ttl: Optional[float] = None) -> None:
        """Hand a claimed job to the fork server for slot ``index``. If the server cannot take it (gone, or stalled
        past ``forkserver.SEND_TIMEOUT`` with a large payload), the server is replaced and the slot is marked
        ``unstarted``: :meth:`collect` returns it, to be put back."""
        slot = self.slots[index]
        self._seq += 1
        slot.seq, slot.raw, slot.doc, slot.queue = self._seq, raw, doc, queue
        slot.timeout, slot.retries, slot.started = timeout, retries, time.monotonic()
        slot.max_interruptions, slot.result_ttl = max_interruptions, result_ttl
        r, w = os.pipe()
        slot.r = r
        fcntl.fcntl(r, fcntl.F_SETFL, os.O_NONBLOCK)
        try:
            self.forks.send(slot.seq, raw, w)
        except ForkServerError as exc:  # never re-sent on this server: it may hold half a message
            self._server_failed(str(exc))
        finally:
            os.close(w)

    def progress(self) -> list:
        """``(slot, checkpoint JSON)`` of running jobs whose checkpoint changed since it was last saved (valid JSON
        only: the child is the app's code, and recovery splices this text into a payload)."""
        out = []
        for s in self.slots:
            if s.busy and s.status is None and s.checkpoint is not None and s.checkpoint != s.saved:
                try:
                    json.loads(s.checkpoint)
                except (ValueError, RecursionError):
                    s.saved = s.checkpoint
                    continue
                out.append((s.index, s.checkpoint))
        return out

    def saved(self, progress: list) -> None:
        for index, value in progress:
            self.slots[index].saved = value

    def fds(self) -> list:
        out = [s.r for s in self.slots if s.busy and not s.eof and s.r >= 0]
        out += [s.pidfd for s in self.slots  # a killed child's exit ends its job (see Slot.finished)
                if s.busy and s.killed is not None and s.pidfd >= 0 and not s.exited_at and s.status is None]
        if self.forks.sock is not None:
            out.append(self.forks.fileno())
        return out

    def service(self) -> None:
        """Signals and kills that are due now, for every running slot. Never blocks, never touches Redis."""
        now = time.monotonic()
        sig, cfg = self.sig, self.cfg
        usr1 = sig.kill_child
        sig.kill_child = False
        for s in self.slots:
            if not s.busy or not s.pid or s.status is not None:
                continue
            if sig.stop_at is not None:
                since = now - sig.stop_at
                if not s.termed:
                    s.termed = True
                    _signal(s.pid, signal.SIGTERM)
                if not s.raised and since >= cfg.term_grace:
                    s.raised = True
                    _signal(s.pid, RAISE_SIGNAL)
                    self.log.info("shutdown.exception_delivered", pid=s.pid, slot=s.index, elapsed=round(since, 3))
                if s.killed is None and since >= cfg.term_grace + cfg.term_timeout:
                    s.kill(Kill.DEADLINE)
                    self.log.warning("shutdown.child_killed", pid=s.pid, slot=s.index, elapsed=round(since, 3),
                                     reason="TERM_TIMEOUT reached")
            if usr1:
                s.kill(Kill.USR1)
            if s.timeout and now >= s.started + s.timeout:
                s.kill(Kill.TIMEOUT)
        limit = cfg.job_max_memory_mb
        if limit and now >= self._next_memory:
            self._next_memory = now + MEMORY_POLL
            for s in self.slots:
                if s.busy and s.pid and s.killed is None and s.status is None and job_private_mb(s.pid) > limit:
                    s.kill(Kill.MEMORY)
                    self.log.warning("job.memory_exceeded", job=s.doc.get("id"), slot=s.index, limit_mb=limit)

    def due(self) -> float:
        """Seconds until :meth:`service` has something to do (at most a second)."""
        now, cfg, sig = time.monotonic(), self.cfg, self.sig
        at = now + 1.0
        for s in self.slots:
            if not s.busy or s.status is not None:
                continue
            if not s.pid:
                at = min(at, s.started + SPAWN_TIMEOUT)
                continue
            if s.exited_at:  # the stop's steps below still apply (an interrupted run waits for its exit status)
                at = min(at, s.exited_at + (EXIT_WAIT if s.killed is not None else REAP_TIMEOUT))
            if sig.stop_at is not None:  # each step at its time; a child whose pid came after the stop: at once
                if not s.termed:
                    at = now
                elif not s.raised:
                    at = min(at, sig.stop_at + cfg.term_grace)
                elif s.killed is None:
                    at = min(at, sig.stop_at + cfg.term_grace + cfg.term_timeout)
            if s.timeout and s.killed is None:
                at = min(at, s.started + s.timeout)
            if cfg.job_max_memory_mb:
                at = min(at, self._next_memory)
        return max(0.0, at - now)

    def collect(self) -> list:
        """Slots whose job is :attr:`~Slot.finished` (its report read, or its child reaped without one), plus,
        after a fork-server failure, every busy slot (``unstarted`` ones never reached a child). The caller records
        each and calls ``clear()``; an exit status that comes after that is about no slot and is ignored."""
        failure = self._take_in()
        if failure is not None:
            self._server_failed(failure)
        done = []
        for s in self.slots:
            if s.finished:
                if s.r >= 0 and not s.eof:
                    s.read()  # the last of what it wrote (a killed child's exit may come before its pipe's end)
                if s.r >= 0:
                    os.close(s.r)
                    s.r = -1
                if s.status is None and s.report:  # still exiting: watched until its exit is reported (its pid
                    self.exiting[s.seq] = s.pid    # may come after its report: 0 until then, see _frame)
                else:
                    self.sig.child_pids.discard(s.pid)
                done.append(s)
        return done

    def poll(self) -> bool:
        """Take in what the fork server and the report pipes have to say now (never blocks). True if that is worth
        a turn of the worker's loop: a slot finished, the fork server failed (:meth:`collect` acts on both), or a
        new fork server became ready (slots are free to claim into again). A job's start (its pid), a checkpoint
        and the exit status of a job already finished are not: the loop's wait goes on."""
        was_ready = self.forks.ready
        if self._take_in() is not None or (self.forks.ready and not was_ready):
            return True
        return any(s.finished for s in self.slots)

    def _take_in(self):
        """Read the fork server's frames, the report pipes and the pidfds; the fork-server failure seen, if any."""
        failure = None
        if self.forks.sock is not None:
            try:
                for kind, seq, value in self.forks.frames():
                    self._frame(kind, seq, value)
            except ForkServerError as exc:
                failure = str(exc)
        now = time.monotonic()
        watched = [s.pidfd for s in self.slots if s.busy and s.pidfd >= 0 and not s.exited_at and s.status is None]
        gone = set(select.select(watched, [], [], 0)[0]) if watched else ()
        for s in self.slots:
            if s.busy and not s.eof and s.r >= 0:
                s.read()
            if s.pidfd in gone:
                s.exited_at = now
            if failure is None and s.busy and not s.pid and now - s.started > SPAWN_TIMEOUT:
                failure = f"fork server did not start a job in {SPAWN_TIMEOUT:g} s"
            if failure is None and s.exited_at and s.status is None and now - s.exited_at > REAP_TIMEOUT:
                failure = f"fork server did not report a finished job in {REAP_TIMEOUT:g} s"
        return failure

    def _frame(self, kind, seq, value) -> None:
        slot = next((s for s in self.slots if s.busy and s.seq == seq), None)
        if slot is None:  # R/E frames, or a frame about a job already recorded or written off
            if kind == b"S" and seq in self.exiting:
                self.sig.child_pids.discard(self.exiting.pop(seq))
            elif kind == b"P" and seq in self.exiting:  # its report came first
                self.exiting[seq] = value
                self.sig.child_pids.add(value)
            return
        if kind == b"P":
            slot.pid = value
            self.sig.child_pids.add(value)
            if slot.killed is not None:  # killed before its pid was known (a claim found lost)
                kill_job(value, signal.SIGKILL)
            try:  # a stalled fork server cannot hide a child's end from us: we watch it too
                slot.pidfd = os.pidfd_open(value)
            except (AttributeError, OSError):
                slot.pidfd = -1  # gone already (its S frame follows), or no pidfds here
        elif kind == b"S":
            slot.status = value
            if not slot.eof:
                slot.read()
                slot.eof = True  # the child is gone: whatever it wrote has been read

    def _server_failed(self, reason: str) -> None:
        """The fork server exited or stalled: make sure it and its children are gone, write every job in flight
        off (started ones as crashed unless they reported, unstarted ones to be put back), and start a new server
        unless stopping. The process groups of the children go first, while a stalled server still pins their
        pids: what the jobs started never outlives them, reported or not."""
        was_ready = self.forks.ready
        self.log.warning("forkserver.restart", reason=reason)
        self._end_exiting()
        for s in self.slots:
            if not s.busy or s.status is not None:
                continue
            if s.pid:
                if not s.eof:
                    s.read()
                if s.report:  # what it reported stands; end what it left running
                    kill_job(s.pid, signal.SIGKILL)
                else:  # killed with the server (parent-death signal), whether or not its exit was seen yet
                    s.kill(Kill.FORKSERVER)
                s.status, s.eof = 0, True
            else:
                s.unstarted = True
        self.forks.kill()
        self._sweep()
        self.restarts += 1
        if not was_ready:  # a new server that dies before it is ready would die again: give up (exit 1)
            self.broken = f"cannot start jobs: {reason}"
        elif self.sig.stop_at is None and not self.sig.quit:
            self.start_server()

    def _end_exiting(self) -> None:
        """Kill the process groups of children whose job was recorded from its report but whose exit the fork
        server has not reported (it would have ended them before reaping)."""
        for pid in self.exiting.values():
            if pid:
                kill_job(pid, signal.SIGKILL)
                self.sig.child_pids.discard(pid)
        self.exiting.clear()

    def close(self, wait: float = 1.0) -> None:
        """Let the fork server leave (it reaps its children, and ends their groups, at end of file). If it does
        not leave cleanly (it lingers past ``wait`` s and is killed, or it had died), the worker ends the groups of
        the children it still held, and what they left."""
        self.forks.stop(wait, on_unclean=self._end_exiting)
        self._sweep(wait)

    def _sweep(self, limit: float = 1.0) -> None:
        """The fork server is gone (reaped): its children and whatever they left were adopted by the worker, if
        it is a subreaper (``orphans.enable``, ``cli run`` only); end and reap them, at most ``limit`` s."""
        if orphans.enabled:
            ended = orphans.sweep(limit=limit)
            if ended:
                self.log.warning("forkserver.leftovers_ended", count=ended)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
