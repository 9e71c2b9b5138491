"""Run one job in a forked child and supervise it to the end (Sidekiq's processor, one fork per job).

The child is forked by the fork server (``forkserver.py``) rather than by this process, which keeps the worker's
own memory free of copy-on-write faults; the worker still signals the child directly and owns every deadline.

The parent waits in ``select`` on the child's report pipe and the signal wake-up pipe, so every stage of a shutdown
happens within a millisecond of its time, all derived from one moment (the first TERM/INT)::

    stop_at                       SIGTERM to the child (so foreman's parent-only TERM equals Heroku's)
    stop_at + TERM_GRACE          RAISE signal: TermException in the job
    stop_at + GRACE + TIMEOUT     SIGKILL: the job is put back at the head of its queue

The result is a plain dict: ``status`` is one of ``ok``, ``error``, ``interrupted``, ``timeout``, ``killed``,
``crash``, with ``type``/``message``/``traceback`` where known.
"""
from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import time

from .forkserver import ForkServer, ForkServerError
from .signals import RAISE_SIGNAL


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"child killed by {name}"
    return f"child exited with code {os.WEXITSTATUS(status)} without reporting"


class Processor:
    """Forks and supervises one job at a time. ``tick`` runs between waits (heartbeats) and ``on_stop`` once when a
    stop is first seen during a job; neither may raise or block for long."""

    def __init__(self, cfg, sig, log, tick=lambda: None, on_stop=lambda: None):
        self.cfg, self.sig, self.log, self.tick, self.on_stop = cfg, sig, log, tick, on_stop
        self.forks = ForkServer(cfg)

    def run(self, spec, doc, raw: str) -> dict:
        """Run payload ``raw`` (already decoded into ``doc`` and checked against ``spec``) in a child; returns the
        result dict. Raises :class:`ForkServerError` if no child could be started (twice): the job never ran."""
        timeout = spec.timeout if spec.timeout is not None else self.cfg.job_timeout
        self.sig.kill_child = False  # a USR1 that came while no job ran was about no job
        r, w = os.pipe()
        try:
            try:
                pid = self.forks.spawn(raw, w)
            except ForkServerError as exc:
                self.log.warning("forkserver.restart", reason=str(exc))
                pid = self.forks.spawn(raw, w)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        self.sig.child_pid = pid
        fcntl.fcntl(r, fcntl.F_SETFL, os.O_NONBLOCK)
        try:
            return self._supervise(pid, r, timeout)
        finally:
            self.sig.child_pid = 0
            os.close(r)

    def close(self) -> None:
        self.forks.stop()

    def _supervise(self, pid: int, r: int, timeout: float) -> dict:
        cfg, sig = self.cfg, self.sig
        started = time.monotonic()
        chunks, killed_for, termed, raised, eof = [], None, False, False, False
        while True:
            try:
                status = self.forks.poll()
            except ForkServerError:  # the server died; the child died with it (parent-death signal)
                status = None
                killed_for = killed_for or "forkserver"
                break
            if status is not None:
                break
            self.tick()  # first: it may wait on Redis (bounded), and every deadline below is computed after it
            now = time.monotonic()
            wait = min(1.0, cfg.heartbeat_interval)  # tick() must run at least once per heartbeat interval
            if sig.stop_at is not None:
                since = now - sig.stop_at
                first = not termed
                if first:
                    termed = True
                    self._signal(pid, signal.SIGTERM)
                raise_at = cfg.term_grace
                if not raised and since >= raise_at:
                    raised = True
                    self._signal(pid, RAISE_SIGNAL)
                    self.log.info("shutdown.exception_delivered", pid=pid, elapsed=round(since, 3))
                kill_at = cfg.term_grace + cfg.term_timeout
                if killed_for is None and since >= kill_at:
                    killed_for = "deadline"
                    self._signal(pid, signal.SIGKILL)
                    self.log.warning("shutdown.child_killed", pid=pid, elapsed=round(since, 3),
                                     reason="TERM_TIMEOUT reached")
                if first:  # after the signals above: its bounded Redis call must not delay the exception
                    self.on_stop()
                    continue  # the call may have taken a while: recompute every deadline
                if not raised:
                    wait = min(wait, max(0.0, raise_at - since))
                elif killed_for is None:
                    wait = min(wait, max(0.0, kill_at - since))
            if sig.kill_child and killed_for is None:
                sig.kill_child = False
                killed_for = "usr1"
                self._signal(pid, signal.SIGKILL)
            if timeout and killed_for is None:
                left = started + timeout - now
                if left <= 0:
                    killed_for = "timeout"
                    self._signal(pid, signal.SIGKILL)
                else:
                    wait = min(wait, left)
            # Once the report pipe is at EOF the child is exiting: wait for the server's exit-status frame instead
            # of spinning on a pipe that stays readable.
            watch = [self.forks.fileno(), sig.wake_r] if eof else [r, self.forks.fileno(), sig.wake_r]
            try:
                ready, _, _ = select.select(watch, [], [], wait)
            except InterruptedError:
                ready = []
            if r in ready:
                eof = self._read(r, chunks)
            if sig.wake_r in ready:
                sig.drain()
        self._read(r, chunks)
        return self._result(b"".join(chunks), status, killed_for, termed, timeout, time.monotonic() - started)

    @staticmethod
    def _signal(pid, signum):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass  # already gone; waitpid will tell how

    @staticmethod
    def _read(fd, chunks) -> bool:
        """Read what the pipe holds; True at end of file."""
        try:
            while True:
                data = os.read(fd, 65536)
                if not data:
                    return True
                chunks.append(data)
        except BlockingIOError:
            return False

    @staticmethod
    def _result(data: bytes, status: int, killed_for, termed: bool, timeout: float, duration: float) -> dict:
        report = None
        if data:
            try:
                report = json.loads(data)
            except ValueError:
                report = None
        if isinstance(report, dict) and report.get("status") in ("ok", "error", "interrupted"):
            res = report
        elif killed_for == "deadline" or (termed and killed_for in ("timeout", "usr1")):
            res = {"status": "interrupted", "message": "killed at the TERM_TIMEOUT deadline"}
        elif killed_for == "timeout":
            res = {"status": "timeout", "type": "JobTimeout", "message": f"timed out after {timeout:g} s"}
        elif killed_for == "forkserver":
            res = {"status": "crash", "type": "ChildCrashed", "message": "the fork server died during the job"}
        elif killed_for == "usr1":
            res = {"status": "killed", "type": "Killed", "message": "killed by SIGUSR1 to the worker"}
        elif termed:  # died some other way during a shutdown: it was interrupted, not broken
            res = {"status": "interrupted", "message": describe_status(status)}
        else:
            res = {"status": "crash", "type": "ChildCrashed", "message": describe_status(status)}
        res["duration"] = duration
        return res
