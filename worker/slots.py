"""The slot table: up to ``WORKER_CONCURRENCY`` job children at once, each supervised to the end (Sidekiq's
manager and processors, one fresh fork per job). A slot and its parts: ``slot.py``.

The table never waits and never touches Redis. The supervisor's loop selects on :meth:`SlotTable.fds`, then calls
:meth:`SlotTable.service` (signals and kills, derived from the clock) and :meth:`SlotTable.collect` (finished
children). A stop's steps for every running slot: ``stops.py`` (the one description of that timeline). Kills go to
the child's process group, so what a job started dies with it.
"""
from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import time
from typing import Optional

from . import orphans
from .claimed import ClaimedJob
from .forkserver import ForkServer, ForkServerError
from .policy import Kill
from .signals import RAISE_SIGNAL, kill_job
from .slot import EXIT_WAIT, Report, Slot, job_private_mb
from .stops import STEPS, Stage, next_step

SPAWN_TIMEOUT = 10.0    # a fork server that has not handed a job to a child by then is wedged: replaced
REAP_TIMEOUT = 10.0     # ... or that has not reported a child's exit this long after it exited
START_TIMEOUT = 120.0   # importing the app (Django set-up and the like) may take this long
MEMORY_POLL = 0.25      # how often a child's memory is read when JOB_MAX_MEMORY_MB is set


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

    def start(self, job: ClaimedJob) -> None:
        """Hand a claimed job to the fork server for its slot. If the server cannot take it (gone, or stalled past
        ``forkserver.SEND_TIMEOUT`` with a large payload), the server is replaced and the slot is marked
        ``unstarted``: :meth:`collect` returns it, to be put back."""
        slot = self.slots[job.slot]
        self._seq += 1
        slot.seq, slot.job, slot.started = self._seq, job, time.monotonic()
        r, w = os.pipe()
        slot.out = Report(r)
        fcntl.fcntl(r, fcntl.F_SETFL, os.O_NONBLOCK)
        try:
            self.forks.send(slot.seq, job.raw, w)
        except ForkServerError as exc:  # never re-sent on this server: it may hold half a message
            self._server_failed(str(exc))
        finally:
            os.close(w)

    def progress(self) -> list:
        """``(slot, checkpoint JSON)`` of running jobs whose checkpoint changed since it was last saved (valid JSON
        only: the child is the app's code, and recovery splices this text into a payload)."""
        out = []
        for s in self.slots:
            value = s.out.checkpoint
            if s.busy and s.child.status is None and value is not None and value != s.saved:
                try:
                    json.loads(value)
                except (ValueError, RecursionError):
                    s.saved = value
                    continue
                out.append((s.index, value))
        return out

    def saved(self, progress: list) -> None:
        for index, value in progress:
            self.slots[index].saved = value

    def fds(self) -> list:
        out = [s.out.fd for s in self.slots if s.busy and not s.out.eof and s.out.fd >= 0]
        out += [s.child.pidfd for s in self.slots  # a killed child's exit ends its job (see Slot.finished)
                if s.busy and s.killed is not None and self._watched(s)]
        if self.forks.sock is not None:
            out.append(self.forks.fileno())
        return out

    @staticmethod
    def _watched(s: Slot) -> bool:
        c = s.child
        return c.pidfd >= 0 and not c.exited_at and c.status is None

    def service(self) -> None:
        """Signals and kills that are due now, for every running slot. Never blocks, never touches Redis."""
        now = time.monotonic()
        usr1 = self.sig.kill_child
        self.sig.kill_child = False
        for s in self.slots:
            if not s.busy or not s.child.pid or s.child.status is not None:
                continue
            self._stop_steps(s, now)
            if usr1:
                s.kill(Kill.USR1)
            if s.canceled_at is not None and now >= s.canceled_at + self.cfg.term_timeout:
                s.kill(Kill.CANCEL)  # TermException was not enough
            timeout = s.job.options.timeout
            if timeout and now >= s.started + timeout:
                s.kill(Kill.TIMEOUT)
        limit = self.cfg.job_max_memory_mb
        if limit and now >= self._next_memory:
            self._next_memory = now + MEMORY_POLL
            for s in self.slots:
                if s.busy and s.child.pid and s.killed is None and s.child.status is None \
                        and job_private_mb(s.child.pid) > limit:
                    s.kill(Kill.MEMORY)
                    self.log.warning("job.memory_exceeded", job=s.job.id, slot=s.index, limit_mb=limit)

    def cancel(self, ids) -> None:
        """cancel(running=True) for the jobs ``ids`` (from a beat's CYCLE reply): each running one gets TERM and
        ``TermException`` at once (the stop timeline's first two signals), and the kill ``TERM_TIMEOUT`` later."""
        for s in self.slots:
            if s.busy and s.job is not None and s.job.id in ids and s.canceled_at is None:
                s.canceled_at = time.monotonic()
                self.log.info("job.cancel_requested", job=s.job.id, slot=s.index, pid=s.child.pid)
                if s.child.pid and s.child.status is None:
                    _signal(s.child.pid, signal.SIGTERM)
                    _signal(s.child.pid, RAISE_SIGNAL)

    def _stop_steps(self, s: Slot, now: float) -> None:
        """Take every step of the stop timeline (``stops.STEPS``) whose time has come for slot ``s``."""
        stop_at = self.sig.stop_at
        step = next_step(s.stage) if stop_at is not None else None
        while step is not None and now >= stop_at + step.offset(self.cfg):
            s.stage = step.stage
            since = round(now - stop_at, 3)
            if step.stage is Stage.KILLED:
                if s.killed is None:  # (killed already for another reason: nothing more to do)
                    s.kill(Kill.DEADLINE)
                    self.log.warning(step.event, pid=s.child.pid, slot=s.index, elapsed=since,
                                     reason="TERM_TIMEOUT reached")
            else:
                _signal(s.child.pid, step.signum)
                if step.event:
                    self.log.info(step.event, pid=s.child.pid, slot=s.index, elapsed=since)
            step = next_step(s.stage)

    def _next_stop_step(self, s: Slot) -> Optional[float]:
        """When :meth:`_stop_steps` has something to do for ``s`` (monotonic), or None."""
        step = next_step(s.stage) if self.sig.stop_at is not None else None
        if step is None or (step.stage is Stage.KILLED and s.killed is not None):
            return None
        return self.sig.stop_at + step.offset(self.cfg)

    def due(self) -> float:
        """Seconds until :meth:`service` (or :meth:`poll`) has something to do (at most a second)."""
        now = time.monotonic()
        at = now + 1.0
        for s in self.slots:
            if not s.busy or s.child.status is not None:
                continue
            if not s.child.pid:
                at = min(at, self._spawn_by(s))
                continue
            exited = s.child.exited_at
            if exited:  # the stop's steps still apply (an interrupted run waits for its exit status)
                at = min(at, exited + (EXIT_WAIT if s.killed is not None else REAP_TIMEOUT))
            step_at = self._next_stop_step(s)  # a child whose pid came after the stop: at once
            if step_at is not None:
                at = min(at, step_at)
            if s.job.options.timeout and s.killed is None:
                at = min(at, s.started + s.job.options.timeout)
            if self.cfg.job_max_memory_mb:
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
                if s.out.fd >= 0 and not s.out.eof:
                    s.out.read()  # the last of what it wrote (a killed child's exit may come before its pipe's end)
                s.out.close()
                if s.child.status is None and s.out.report:  # still exiting: watched until its exit is reported
                    self.exiting[s.seq] = s.child.pid  # (its pid may come after its report: 0 until then, _frame)
                else:
                    self.sig.child_pids.discard(s.child.pid)
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
        watched = [s.child.pidfd for s in self.slots if s.busy and self._watched(s)]
        gone = set(select.select(watched, [], [], 0)[0]) if watched else ()
        for s in self.slots:
            c = s.child
            if s.busy and not s.out.eof and s.out.fd >= 0:
                s.out.read()
            if c.pidfd in gone:
                c.exited_at = now
            if failure is None and s.busy and not c.pid and now > self._spawn_by(s):
                failure = f"fork server did not start a job in {min(now - s.started, SPAWN_TIMEOUT):.3g} s"
            if failure is None and c.exited_at and c.status is None and now - c.exited_at > REAP_TIMEOUT:
                failure = f"fork server did not report a finished job in {REAP_TIMEOUT:g} s"
        return failure

    def _spawn_by(self, s: Slot) -> float:
        """When the fork server must have started slot ``s``'s job (monotonic), or be written off as wedged:
        SPAWN_TIMEOUT after the handover, and during a stop no later than its deadline step (``stops.STEPS``), when
        every job must be gone: a job not started by then goes back unstarted, inside the window."""
        at = s.started + SPAWN_TIMEOUT
        if self.sig.stop_at is not None:
            at = min(at, self.sig.stop_at + STEPS[Stage.KILLED - 1].offset(self.cfg))
        return at

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
            self.sig.child_pids.add(value)
            if slot.killed is not None:  # killed before its pid was known (a claim found lost)
                kill_job(value, signal.SIGKILL)
            slot.child.watch(value)
        elif kind == b"S":
            slot.child.status = value
            if not slot.out.eof:
                slot.out.read()
                slot.out.eof = True  # the child is gone: whatever it wrote has been read

    def _server_failed(self, reason: str) -> None:
        """The fork server exited or stalled: make sure it and its children are gone, write every job in flight
        off (started ones as crashed unless they reported, unstarted ones to be put back), and start a new server
        unless stopping. The process groups of the children go first, while a stalled server still pins their
        pids: what the jobs started never outlives them, reported or not."""
        was_ready = self.forks.ready
        self.log.warning("forkserver.restart", reason=reason)
        self._end_exiting()
        for s in self.slots:
            if not s.busy or s.child.status is not None:
                continue
            if s.child.pid:
                if not s.out.eof:
                    s.out.read()
                if s.out.report:  # what it reported stands; end what it left running
                    kill_job(s.child.pid, signal.SIGKILL)
                else:  # killed with the server (parent-death signal), whether or not its exit was seen yet
                    s.kill(Kill.FORKSERVER)
                s.child.status, s.out.eof = 0, True
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
