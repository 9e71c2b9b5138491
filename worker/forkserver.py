"""The fork server: the one process that imports the app (``JOB_MODULES``) and forks every job child.

Why a separate process: the app is held once, here, frozen (``gc.freeze``) before any fork, and every job child
shares it copy-on-write; the worker (supervisor) never imports it, so a dyno holds the app once, not twice. And a
process that only receives a payload, forks and reaps keeps its pages clean: the worker touches hundreds of pages
per job (the Redis call, the log line, JSON), which after a fork would each cost a copy-on-write fault.

Process tree::

    python -m worker                   supervisor: Redis, slots, deadlines, every signal decision
    └── python -m worker.forkserver    imports the app, forks and reaps, nothing else
        ├── job child                  one per running job (child.py), each in its own process group,
        └── job child ...              signalled by the worker directly (by process group for kills)

* The fork server blocks the stop signals (its column of ``signals.TABLE``): Heroku's or a group's
  TERM/INT/QUIT/USR1/USR2 stay pending and are never acted on. The job child inherits that mask, so a signal that
  reaches it before its handlers exist is delivered right after (``child.run`` unblocks), never lost.
* It dies with the worker (parent-death signal, and end of file on its socket); job children die with it. At end of
  file it first gives the children still exiting after their final report (the worker records a job from its
  report and does not wait for the exit) ``LEAVE_GRACE`` to finish flushing the job's output, then ends every
  child's process group (whatever the jobs left running) and reaps it.
* It is a child subreaper (``orphans.py``): when a job child dies, what the job left in other sessions (a
  double-forked daemon) is adopted here, and ended and reaped before that child's exit is reported (``S``): a job
  put back or retried never runs beside its previous run's helpers.
* It keeps one spare child forked ahead of time, blocked waiting for its payload, so the fork for the next job
  overlaps the current ones; each child still runs exactly one job.

The worker and the server talk over a Unix stream socket: one message per job in, ``P`` (the child has it) and
``S`` (it is reaped) frames out, ``R``/``E`` once at start. The formats are in ``protocol.py``.
"""
from __future__ import annotations

import gc
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

from . import orphans, protocol
from . import signals

FRAME, _recv_job = protocol.SERVER_FRAME, protocol.recv_job  # tests/test_units.py reads these names
SEND_TIMEOUT = 2.0  # a payload the server does not take this fast (it is stalled): the server is replaced
LEAVE_GRACE = 0.5   # at end of file, children still exiting get this long before their process groups are killed
BLOCKED = signals.blocked(signals.FORK_SERVER)  # the fork server's column of signals.TABLE


class ForkServerError(Exception):
    """The fork server is gone, answered nonsense or could not start; the worker starts a new one."""


class ForkServer:
    """The worker's handle on its fork server. Non-blocking after :meth:`start`: the worker's loop selects on
    :meth:`fileno` and calls :meth:`frames`; ``meta`` is set once the server is ready."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.proc: Optional[subprocess.Popen] = None
        self.sock: Optional[socket.socket] = None
        self.meta: Optional[dict] = None   # job name -> {"queue", "timeout", "retries"} once ready
        self.error: Optional[str] = None   # the server's one-line start-up error (JOB_MODULES cannot be imported)
        self._buf = b""
        self._eof = False

    @property
    def ready(self) -> bool:
        return self.meta is not None

    def start(self) -> None:
        """Exec a new server; it is ready once :meth:`frames` has read its ``R`` frame."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
        # -P: the server's sys.path is exactly ours (PYTHONPATH above), without the working directory put first as
        # `-m` would: an app's own ./worker.py can never stand in for this package there (worker/launch.py)
        args = [sys.executable, "-P", "-c", "import runpy; runpy.run_module('worker.forkserver', run_name='__main__')",
                str(theirs.fileno()), str(os.getpid()),
                repr(self.cfg.term_grace), ",".join(self.cfg.job_modules), self.cfg.log_level,
                "0" if self.cfg.dyno else "1"]
        self.proc = subprocess.Popen(args, pass_fds=[theirs.fileno()], env=env, close_fds=True)
        theirs.close()
        mine.set_inheritable(False)
        self.sock, self._buf, self.meta, self.error, self._eof = mine, b"", None, None, False

    def send(self, seq: int, raw: str, report_w: int) -> None:
        """Hand job ``seq`` to the server (its ``P`` frame follows). Raises :class:`ForkServerError`."""
        try:
            self.sock.settimeout(SEND_TIMEOUT)  # a payload larger than the socket buffer waits for the server
            try:
                protocol.send_job(self.sock, seq, raw.encode("utf-8", "surrogateescape"), report_w)
            finally:
                self.sock.settimeout(None)  # frames are read with MSG_DONTWAIT on a blocking socket
        except socket.timeout:
            raise ForkServerError(f"fork server took no job for {SEND_TIMEOUT:g} s (stalled)") from None
        except (OSError, AttributeError) as exc:
            raise ForkServerError(f"fork server unavailable: {exc}") from None

    def frames(self) -> list:
        """Every complete ``(kind, seq, value)`` frame available now (never blocks). Raises
        :class:`ForkServerError` at end of file (the server exited) or on a frame it does not understand."""
        if self._eof:
            raise ForkServerError("fork server exited")
        try:
            while True:
                chunk = self.sock.recv(65536, socket.MSG_DONTWAIT)
                if not chunk:  # frames before the end still count (a child reaped just before): raise next time
                    self._eof = True
                    break
                self._buf += chunk
        except BlockingIOError:
            pass
        except OSError as exc:
            raise ForkServerError(f"fork server unavailable: {exc}") from None
        out = []
        while True:
            try:
                frame = protocol.decode_server_frame(self._buf)
            except protocol.UnknownFrame as exc:
                raise ForkServerError(f"fork server answered {exc.args[0]!r}") from None
            if frame is None:
                break
            kind, seq, value, body, size = frame
            if kind == protocol.READY:
                self.meta = body
            elif kind == protocol.FAILED:
                self.error = str(body)
            self._buf = self._buf[size:]
            out.append((kind, seq, value))
        if self._eof and not out:
            raise ForkServerError("fork server exited")
        return out

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def kill(self) -> None:
        """Kill a server that stalled or misbehaved (its children die with it: parent-death signal), then reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self.stop()

    def stop(self, wait: float = 1.0, on_unclean=None) -> None:
        """Close the socket (the server exits on end of file) and reap it. If it does not leave cleanly (it
        lingers ``wait`` s, or it had died), call ``on_unclean`` (and kill it if it lingers)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            try:
                if self.proc.wait(wait) != 0 and on_unclean is not None:
                    on_unclean()
            except subprocess.TimeoutExpired:
                if on_unclean is not None:
                    on_unclean()
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        self.meta = None


def _spare(listen: socket.socket, me: int, child, jobs) -> None:
    """Body of a pre-forked child: wait for one job, run it, exit. Never returns.

    Stop signals stay blocked (pending) while it waits; ``child.run`` unblocks them, so a TERM that arrived in the
    meantime is delivered as the job starts, exactly as for a child forked on demand. End of file on ``listen``
    (the fork server is gone or stopping) ends it without running anything.
    """
    try:
        child.setup(me)
        job = protocol.recv_job(listen)
        if job is None:
            os._exit(0)
        _, data, report_w = job
        listen.close()
        child.run_payload(data, report_w)
    except BaseException:  # a runtime bug, not the job's: say so before leaving
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(71)


def _frame(sock, kind: bytes, seq: int, value: int, body=None) -> None:
    sock.sendall(protocol.server_frame(kind, seq, value, body))


def _end_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass  # no group left (the child had not set it up yet, or nothing else was in it)


def _watch(pid: int):
    """A file descriptor that becomes readable when child ``pid`` exits (pidfd), or None where there is none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _leave(running: dict, spare: int) -> None:
    """End of file: the worker is leaving. Its slots are empty, but children whose job it recorded from their
    report may still be exiting (flushing the job's output): give them ``LEAVE_GRACE`` s, then end every child's
    process group (what the jobs left running) and reap it, and the pre-forked ``spare``, then what they left
    elsewhere."""
    deadline = time.monotonic() + LEAVE_GRACE
    fds = [w for w in running if w >= 0]
    while fds and deadline > time.monotonic():
        ready = select.select(fds, [], [], max(0.0, deadline - time.monotonic()))[0]
        fds = [w for w in fds if w not in ready]
    for pid in [pid for pid, _ in running.values()] + [spare]:
        _end_group(pid)
        try:
            os.kill(pid, signal.SIGKILL)  # in case it left its own group: the wait must end
        except OSError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    # the spare is ended and reaped here too: left to die with us, it would reach the worker (a subreaper) as an
    # orphan and be counted as a job's leftover (forkserver.leftovers_ended on every exit)
    orphans.sweep(single=True)


def _reaped(running: dict, spare: int) -> None:
    """A job child was just reaped: end and reap what it left to us (our children that are neither a running job
    child nor the spare; a running job child is a subreaper itself, so nothing of a running job lands here)."""
    found = orphans.children(single=True)  # the common case: the running children and the spare, nothing else
    if len(found) > len(running) + 1:
        keep = {pid for pid, _ in running.values()}
        keep.add(spare)
        orphans.sweep(keep, single=True)


def serve(fd: int, parent: int, grace: float, modules, log_level: str = "INFO", stamp: bool = True) -> int:
    """The fork server's process (exec'd by :meth:`ForkServer.start`): import the app, say ``R`` (or ``E``), then
    :meth:`_Server.loop` until the worker leaves. Returns the exit code."""
    signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED)
    from . import child, log
    log.setup(log_level, stamp)  # before the app's import: its own logging lines come out formatted too
    child.die_with_parent()  # the worker
    orphans.become_subreaper()  # a dead job child's leftovers come to us: see _reaped
    if os.getppid() != parent:
        return 1
    sock = socket.socket(fileno=fd)
    registry = _import_app(sock, modules)
    if registry is None:
        return 2
    child.install(grace)  # blocked here; inherited by every child
    gc.freeze()  # the app is imported: keep its objects out of the children's collections (fewer pages touched)
    server = _Server(sock)
    _frame(sock, protocol.READY, 0, server.me, registry)
    return server.loop()


def _import_app(sock, modules) -> Optional[dict]:
    """Import ``JOB_MODULES`` (Django set up first) and return the job registry; on a config error, send the ``E``
    frame and return None."""
    from . import frameworks, jobs
    from .config import ConfigError
    try:
        try:
            frameworks.setup()  # Django: django.setup() before the app's jobs modules (which then need none)
        except Exception as exc:
            frames, summary = frameworks.import_failure("django (DJANGO_SETTINGS_MODULE)", exc)
            raise ConfigError("\n".join(frames + [f"DJANGO_SETTINGS_MODULE is not valid: {summary}"])) from None
        jobs.import_modules(modules)
        return jobs.meta()  # checks the schedules too: a bad one is a config error, like a bad module
    except ConfigError as exc:
        _frame(sock, protocol.FAILED, 0, 0, str(exc))
        return None


class _Server:
    """The fork server once the app is imported: hand each job to the spare child, fork the next spare, and report
    each child's exit, for any number of children at once."""

    def __init__(self, sock: socket.socket):
        from . import child, frameworks, jobs
        self.child, self.frameworks, self.jobs = child, frameworks, jobs
        self.sock, self.me = sock, os.getpid()
        self.running: dict = {}    # pidfd (or -pid where pidfds are missing) -> (pid, seq)
        self.spare = self.fork_spare()

    def fork_spare(self):
        """``(pid, socket)`` of a new pre-forked child waiting for its job (:func:`_spare`)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.frameworks.before_fork()  # no database connection shared with a child
        pid = os.fork()
        if pid == 0:
            self.sock.close()
            ours.close()
            for w in self.running:
                if w >= 0:
                    os.close(w)
            _spare(theirs, self.me, self.child, self.jobs)
        theirs.close()
        try:
            os.setpgid(pid, pid)  # also done by the child: whichever runs first, the group exists before any kill
        except OSError:
            pass
        return pid, ours

    def loop(self) -> int:
        while True:
            watch = [self.sock] + [w for w in self.running if w >= 0]
            polling = any(w < 0 for w in self.running)
            ready, _, _ = select.select(watch, [], [], 0.05 if polling else None)
            try:
                self.reap(ready)
            except (BrokenPipeError, ConnectionResetError):
                # the worker closed the socket while a child's exit was being reported (it had the job's report
                # and left): the same end of file that take() would have read next
                _leave(self.running, self.spare[0])
                return 0
            if self.sock in ready and not self.take():
                return 0

    def reap(self, ready) -> None:
        """Reap every job child that exited, ending what it left first; an ``S`` frame for each."""
        for w, (pid, seq) in list(self.running.items()):
            if w >= 0:
                if w not in ready:
                    continue
                # it has exited but is not reaped yet, so its process group id cannot be reused: end whatever
                # the job started and left behind, then reap (a job's processes never outlive it)
                _end_group(pid)
                status = os.waitpid(pid, 0)[1]
                os.close(w)
            else:
                if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                    continue
                _end_group(pid)
                status = os.waitpid(pid, 0)[1]
            del self.running[w]
            _reaped(self.running, self.spare[0])  # before the S frame: reported once all of the job is gone
            _frame(self.sock, protocol.REAPED, seq, status)

    def take(self) -> bool:
        """Hand the worker's next job to the spare child (``P`` frame) and fork the next spare; False when the
        worker closed the socket (everything is ended: leave)."""
        job = protocol.recv_job(self.sock)
        if job is None:  # the worker closed the socket: leave
            _leave(self.running, self.spare[0])
            return False
        seq, data, report_w = job
        pid, line = self.spare
        if os.waitpid(pid, os.WNOHANG)[0]:  # the spare died while waiting (killed from outside): replace it
            line.close()
            pid, line = self.fork_spare()
        try:
            protocol.send_job(line, seq, data, report_w)
        except OSError:
            # Never hand the job to a second child: this one may have it. Kill it; the worker records how it ended.
            os.kill(pid, signal.SIGKILL)
        line.close()
        os.close(report_w)
        w = _watch(pid)
        self.running[w if w is not None else -pid] = (pid, seq)
        _frame(self.sock, protocol.STARTED, seq, pid)
        self.spare = self.fork_spare()  # while the job runs
        return True


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4].split(","), sys.argv[5],
                   sys.argv[6] == "1"))
