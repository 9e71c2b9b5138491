"""The fork server: a lean process that forks the job children, so the worker itself never forks.

Why: after a fork, every page the forking process writes to takes a copy-on-write fault until the child is gone.
The worker touches hundreds of pages per job (the Redis script call, the log line, JSON), which cost more than the
fork itself; a process that only receives a payload, forks and reaps keeps its pages clean. It is exec'd fresh and
imports only ``JOB_MODULES`` (no Redis client), so its children start smaller too.

Process tree::

    python -m worker            supervisor: Redis, deadlines, every signal decision
    └── python -m worker.forkserver    forks and reaps, nothing else
        └── job child           one per job (child.py), signalled by the worker directly by pid

* The fork server blocks the stop signals: Heroku's or a group's TERM/INT/QUIT/USR1/USR2 stay pending and are never
  acted on. The job child inherits that mask, so a signal that reaches it before its handlers exist is delivered
  right after (``child.run`` unblocks), never lost.
* It dies with the worker (parent-death signal, and end of file on its socket); the job child dies with it.

The server keeps one spare child forked ahead of time, blocked waiting for its payload, so the fork for the next
job overlaps the current one; each child still runs exactly one job.

Protocol on a Unix stream socket. Worker to server: 4-byte big-endian length, then the payload JSON, with the write
end of the job's report pipe passed (SCM_RIGHTS) on the first chunk. Server to worker: ``P`` + pid, then ``S`` +
wait status once the child is reaped (8-byte signed integers); ``R`` + its own pid once, when it is ready.
"""
from __future__ import annotations

import gc
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Optional

from .signals import RAISE_SIGNAL

_FRAME = struct.Struct(">cq")
BLOCKED = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, RAISE_SIGNAL}


class ForkServerError(Exception):
    """The fork server is gone or did not answer; the worker starts a new one for the next job."""


class ForkServer:
    """The worker's handle on its fork server (started on first use, restarted after a failure)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.proc: Optional[subprocess.Popen] = None
        self.sock: Optional[socket.socket] = None
        self._buf = b""

    def start(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
        args = [sys.executable, "-m", "worker.forkserver", str(theirs.fileno()), str(os.getpid()),
                repr(self.cfg.term_grace), ",".join(self.cfg.job_modules)]
        self.proc = subprocess.Popen(args, pass_fds=[theirs.fileno()], env=env, close_fds=True)
        theirs.close()
        mine.set_inheritable(False)
        self.sock, self._buf = mine, b""
        try:  # ready once JOB_MODULES are imported (they may be slow: Django set-up and the like)
            kind, _ = self._frame(timeout=120.0)
        except (OSError, ForkServerError) as exc:
            self.stop()
            raise ForkServerError(f"fork server did not start: {exc}") from None
        if kind != b"R":
            self.stop()
            raise ForkServerError(f"fork server answered {kind!r} at start")

    def spawn(self, raw: str, report_w: int) -> int:
        """Have the server fork a child for payload ``raw`` reporting on ``report_w``; returns the child's pid."""
        if self.sock is None:
            self.start()
        try:
            _send_job(self.sock, raw.encode("utf-8", "surrogateescape"), report_w)
            kind, pid = self._frame(timeout=10.0)
        except OSError as exc:
            self.stop()
            raise ForkServerError(f"fork server unavailable: {exc}") from None
        if kind != b"P":
            self.stop()
            raise ForkServerError(f"fork server answered {kind!r}")
        return pid

    def poll(self) -> Optional[int]:
        """The child's wait status if the server reported it, else None (never blocks)."""
        frame = self._frame(timeout=0.0)
        if frame is None:
            return None
        return frame[1]

    def fileno(self) -> int:
        return self.sock.fileno()

    def _frame(self, timeout: float):
        """The next frame; with ``timeout`` 0 return None at once if none is complete (a poll)."""
        deadline = time.monotonic() + timeout
        while len(self._buf) < _FRAME.size:
            left = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                if timeout == 0:
                    return None
                if left == 0:
                    raise ForkServerError("fork server did not answer")
                continue
            chunk = self.sock.recv(4096)
            if not chunk:
                self.stop()
                raise ForkServerError("fork server exited")
            self._buf += chunk
        frame, self._buf = self._buf[:_FRAME.size], self._buf[_FRAME.size:]
        return _FRAME.unpack(frame)

    def stop(self) -> None:
        """Close the socket (the server exits on end of file) and reap it; kill it if it lingers."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            try:
                self.proc.wait(1.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def _send_job(sock: socket.socket, data: bytes, report_w: int) -> None:
    """One job message: length, payload, and the report pipe's write end riding on the first chunk."""
    head = struct.pack(">I", len(data)) + data[:65536]
    sent = socket.send_fds(sock, [head], [report_w])
    rest = head[sent:] + data[65536:]
    if rest:  # sendall(b"") still calls send(): EPIPE if the reader already took the message and closed
        sock.sendall(rest)


def _recv_job(sock: socket.socket):
    """``(payload bytes, report fd)``, or None at end of file (the sender is gone)."""
    msg, fds, _, _ = socket.recv_fds(sock, 65536 + 4, 1)
    if len(msg) < 4 or not fds:
        return None
    need, data = struct.unpack(">I", msg[:4])[0], msg[4:]
    while len(data) < need:
        more = sock.recv(need - len(data))
        if not more:
            return None
        data += more
    return data, fds[0]


def _spare(listen: socket.socket, me: int, child, jobs) -> None:
    """Body of a pre-forked child: wait for one job, run it, exit. Never returns.

    Stop signals stay blocked (pending) while it waits; ``child.run`` unblocks them, so a TERM that arrived in the
    meantime is delivered as the job starts, exactly as for a child forked on demand. End of file on ``listen``
    (the fork server is gone or stopping) ends it without running anything.
    """
    try:
        child.setup(me)
        job = _recv_job(listen)
        if job is None:
            os._exit(0)
        data, report_w = job
        listen.close()
        doc = json.loads(data.decode("utf-8", "surrogateescape"))
        child.run(jobs.registered(doc["name"]), doc, report_w)
    except BaseException:  # a runtime bug, not the job's: say so before leaving
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(71)


def serve(fd: int, parent: int, grace: float, modules) -> int:
    """The fork server's loop (runs in the exec'd process).

    It keeps one spare child forked ahead of time, waiting for its payload: the fork for job N+1 then happens while
    job N runs and the worker records it, instead of on the critical path. Each child still runs exactly one job.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED)
    from . import child, jobs
    if child._libc is not None:
        child._libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the worker
    if os.getppid() != parent:
        return 1
    jobs.import_modules(modules)
    child.install(grace)  # blocked here; inherited by every child
    gc.freeze()  # imports done: keep these objects out of the children's collections (fewer pages touched)
    sock = socket.socket(fileno=fd)
    me = os.getpid()
    sock.sendall(_FRAME.pack(b"R", me))

    def fork_spare():
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            sock.close()
            ours.close()
            _spare(theirs, me, child, jobs)
        theirs.close()
        return pid, ours

    spare = fork_spare()
    while True:
        job = _recv_job(sock)
        if job is None:
            return 0  # the worker closed the socket: leave (the spare sees end of file and exits too)
        data, report_w = job
        pid, line = spare
        if os.waitpid(pid, os.WNOHANG)[0]:  # the spare died while waiting (killed from outside): replace it
            line.close()
            pid, line = fork_spare()
        try:
            _send_job(line, data, report_w)
        except OSError:
            # Never hand the job to a second child: this one may have it. Kill it; the worker records how it ended.
            os.kill(pid, signal.SIGKILL)
        line.close()
        os.close(report_w)
        sock.sendall(_FRAME.pack(b"P", pid))
        spare = fork_spare()  # while job N runs
        _, status = os.waitpid(pid, 0)
        sock.sendall(_FRAME.pack(b"S", status))


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4].split(",")))
