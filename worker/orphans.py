"""Processes a job leaves behind in another session or process group (``start_new_session=True``, a double-forked
daemon), which a kill of the job's process group cannot reach: adopted as orphans, then ended.

Linux's ``PR_SET_CHILD_SUBREAPER`` makes a process adopt the orphaned descendants that would otherwise go to
init. Three processes take that role, so a leftover always lands on one that ends it:

* the job child (``child.setup``): what the job's helpers orphan while it runs stays below it, so it is told apart
  from what other, still running, jobs started;
* the fork server: when a job child ends (returns, killed at a deadline or timeout, crashes) the processes it had
  adopted, and its own children outside its process group, move up to the fork server, which ends them after
  reaping that child and before it reports the exit (the ``S`` frame), so a job put back or retried never runs
  beside its previous run's helpers (``forkserver._reaped``);
* the worker (``cli run`` only, see :func:`enable`): when the fork server itself is killed, the job children die
  with it and their leftovers move up to the worker, which ends them when it writes the server off and as it exits.

Invariants, where :func:`sweep` enforces them:

* Only direct children are signalled, by pid: a child's pid cannot be reused before its parent (the caller) reaps
  it, so a kill never reaches a stranger. Deeper descendants are reached level by level: killing a child orphans
  its own children, the subreaper adopts them, and the next round ends them.
* Every process it kills it reaps by pid, never ``waitpid(-1)``: the caller's other children (``keep``: a fork
  server's spare and running job children, the worker's fork server) and their exit statuses are untouched.

Elsewhere (no prctl, no /proc) everything here is a no-op: the process-group kill still ends what stayed in the
job's group.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
SWEEP_LIMIT = 2.0  # seconds a sweep may take (a process that forks as fast as we kill: give up, say so)

_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        pass

enabled = False  # this process is a subreaper that sweeps (the worker: set by enable(), from ``cli run`` only)


def become_subreaper() -> bool:
    """Make this process adopt its orphaned descendants. False where the platform cannot."""
    if _libc is None:
        return False
    try:
        return _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (AttributeError, OSError):
        return False


def enable() -> None:
    """For the worker process (never a test runner that hosts a Supervisor: it has children of its own, such as
    redis-server, that :func:`sweep` would end)."""
    global enabled
    enabled = become_subreaper()


def _read(path: str) -> list:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return []  # a thread that just ended, or no such file here
    try:
        data = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return [int(x) for x in data.split()]
            data += chunk
    except (OSError, ValueError):
        return []
    finally:
        os.close(fd)


def children(single: bool = False) -> list:
    """This process's children (zombies included), from ``/proc/<pid>/task/<tid>/children`` of each of its
    threads (a child is listed under the thread that forked it, an adopted orphan under the one it was given to);
    ``single``: the caller has one thread (the fork server), so one read. [] where /proc lacks them."""
    me = os.getpid()
    if single:
        return _read(f"/proc/{me}/task/{me}/children")
    try:
        tids = os.listdir(f"/proc/{me}/task")
    except OSError:
        return []
    return [pid for tid in tids for pid in _read(f"/proc/{me}/task/{tid}/children")]


def sweep(keep=(), limit: float = SWEEP_LIMIT, single: bool = False) -> int:
    """SIGKILL and reap every child of this process not in ``keep``, round after round until none is left (each
    round ends one more level of orphans, see the module's invariants) or ``limit`` seconds passed. Returns how
    many were ended. ``single``: see :func:`children`; the common case (nothing left) costs that one read."""
    found = [p for p in children(single) if p not in keep]
    if not found:
        return 0
    deadline = time.monotonic() + limit
    ended = 0
    while True:
        if not found:
            return ended
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in found:
            try:
                os.waitpid(pid, 0)
            except (ChildProcessError, InterruptedError):
                pass  # reaped elsewhere (SIGCHLD ignored by the job's code)
            ended += 1
        if time.monotonic() > deadline:
            return ended
        found = [p for p in children(single) if p not in keep]
