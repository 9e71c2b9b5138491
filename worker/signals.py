"""Signals: the one table of what each process does with each signal (:data:`TABLE`, Sidekiq's
``SIGNAL_HANDLERS``), and the worker's (parent's) handling of them: handlers only record; the supervisor's loop acts.

Handlers set attributes on one :class:`SignalState` and nothing else (no I/O, no Redis, no logging: none of that is
safe to run at an arbitrary point of the main thread). ``signal.set_wakeup_fd`` makes the C-level handler write the
signal number to a non-blocking pipe, so a loop waiting in ``select`` on that pipe wakes at once, even while a
Redis BLPOP is pending.

The worker's actions (Resque's set):

* stop (TERM, INT) - shut down: stop claiming, TermException in the jobs, kill at the deadline, put back, exit 0.
              Only the first one counts: repeats never move the deadline. The first one is also forwarded to the
              running children by the handler itself (``os.kill``, async-signal-safe), so the exception never
              waits for a loop that is blocked on a slow Redis call; everything else waits for the loop.
* quit (QUIT) - stop claiming, let the running jobs finish, then exit; no exception.
* kill_jobs (USR1) - kill every running job child at once (each recorded as failed); keep working.
* pause, resume (USR2, CONT) - pause claiming / resume.
* wake (CHLD) - a child exited (wakes the loop so it can reap at once).
* watchdog (ALRM) - the first TERM/INT arms a timer for the hard exit (``SHUTDOWN_WINDOW`` - 0.5 s). If the
              loop has not exited by then (a Redis call hung past its timeouts), the handler SIGKILLs the children
              and calls ``os._exit``: async-signal-safe calls only. This is the single handler that acts, because
              it exists for the case where the loop cannot; the jobs it abandons are still in the processing list
              and are recovered by another worker, so they are not lost.

The fork server blocks every signal it marks ``BLOCK`` (they stay pending and are inherited, still blocked, by each
job child, which unblocks them as its job starts: ``child.run``). The job child's actions are ``child.py``'s.
"""
from __future__ import annotations

import fcntl
import os
import signal
import time

try:  # the C functions under signal's wrappers: the fork path calls them per job and needs no enum conversion
    import _signal as fast
except ImportError:  # pragma: no cover - other Pythons
    fast = signal
from typing import Optional

# The parent tells the child "raise TermException now" with a signal nobody else sends to a process group: a
# real-time signal on Linux (SIGUSR2 elsewhere, where real-time signals are missing).
RAISE_SIGNAL = getattr(signal, "SIGRTMIN", signal.SIGUSR2)

WATCHDOG_EXIT = 3

#: A signal's disposition in a process, when it is no handler: blocked (pending, inherited by a fork), ignored, or
#: the system default.
BLOCK, IGNORE, DEFAULT = "block", "ignore", "default"

#: What each process does with each signal: ``(signal, worker, fork server, job child)``. A name is a handler: the
#: worker's ``SignalState._on_<name>``, the child's ``child._on_<name>``. Installed in this order (where there is no
#: real-time signal RAISE_SIGNAL is USR2, and its row, last, wins).
TABLE = (
    # signal          worker (supervisor)  fork server  job child
    (signal.SIGTERM,  "stop",              BLOCK,       "stop"),     # Heroku's stop, a group kill
    (signal.SIGINT,   "stop",              BLOCK,       "stop"),     # Ctrl-C
    (signal.SIGQUIT,  "quit",              BLOCK,       IGNORE),     # meant for the worker: the job runs on
    (signal.SIGUSR1,  "kill_jobs",         BLOCK,       IGNORE),
    (signal.SIGUSR2,  "pause",             BLOCK,       IGNORE),
    (signal.SIGCONT,  "resume",            DEFAULT,     DEFAULT),
    (signal.SIGCHLD,  "wake",              DEFAULT,     DEFAULT),    # job code may use subprocess
    (signal.SIGALRM,  "watchdog",          DEFAULT,     DEFAULT),    # job code may use alarm()
    (RAISE_SIGNAL,    DEFAULT,             BLOCK,       "raise"),    # the worker's "TermException now"
)
WORKER, FORK_SERVER, CHILD = 1, 2, 3


def actions(process: int) -> list:
    """``[(signal, action)]`` of one process (a column of :data:`TABLE`: WORKER, FORK_SERVER or CHILD), in order."""
    return [(row[0], row[process]) for row in TABLE]


def blocked(process: int) -> set:
    """The signals ``process`` keeps blocked."""
    return {sig for sig, action in actions(process) if action == BLOCK}


class SignalState:
    """What the signals said. Written only by the handlers (and reset by the loop for ``kill_child``)."""

    def __init__(self, hard_exit_after: Optional[float] = None, grace: float = 0.0):
        self.hard_exit_after = hard_exit_after
        self.grace = grace
        self.child_pids: set = set()           # pids of job children, running or exiting (for the watchdog)
        self.stop_at: Optional[float] = None   # time.monotonic() of the first TERM/INT
        self.stop_signal: Optional[int] = None
        self.stop_count = 0
        self.quit = False
        self.kill_child = False
        self.paused = False
        self.announced = False                 # the loop has logged the stop (once)
        self.wake_r = -1
        self._wake_w = -1

    # handlers: assignments only
    def _on_stop(self, signum, frame):
        self.stop_count += 1
        if self.stop_at is None:
            self.stop_at = time.monotonic()
            self.stop_signal = signum
            if self.hard_exit_after:
                signal.setitimer(signal.ITIMER_REAL, self.hard_exit_after)
            # Forward the stop at once (foreman signals only us): a loop waiting on a slow Redis call must not
            # delay the TermException. The loop sends the same signals again when it acts; the child raises once.
            for pid in list(self.child_pids):
                _send(pid, signal.SIGTERM)
                if self.grace <= 0:
                    _send(pid, RAISE_SIGNAL)

    def _on_watchdog(self, signum, frame):
        for pid in list(self.child_pids):
            kill_job(pid, signal.SIGKILL)
        try:
            os.write(2, b"level=error event=shutdown.watchdog reason=\"hard exit deadline reached\"\n")
        finally:
            os._exit(WATCHDOG_EXIT)

    def _on_quit(self, signum, frame):
        self.quit = True

    def _on_kill_jobs(self, signum, frame):
        self.kill_child = True

    def _on_pause(self, signum, frame):
        self.paused = True

    def _on_resume(self, signum, frame):
        self.paused = False

    def _on_wake(self, signum, frame):
        pass  # the wake-up fd already woke the loop; waitpid happens there

    def announce(self, log) -> None:
        """Log the first stop signal once, from the loop (never from the handler)."""
        if self.stop_at is not None and not self.announced:
            self.announced = True
            log.info("shutdown.signal", signal=_signame(self.stop_signal), count=self.stop_count,
                     elapsed=round(time.monotonic() - self.stop_at, 3))

    @property
    def stopping(self) -> bool:
        return self.stop_at is not None

    def install(self) -> None:
        """Install the handlers and the wake-up pipe (call once, in the parent, from the main thread)."""
        r, w = os.pipe()
        for fd in (r, w):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
            os.set_inheritable(fd, False)
        self.wake_r, self._wake_w = r, w
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig, action in actions(WORKER):
            if action != DEFAULT:
                signal.signal(sig, getattr(self, f"_on_{action}"))

    @staticmethod
    def ignore_stops() -> None:
        """From here on TERM/INT change nothing (the exit is under way); ignoring them keeps a repeated TERM from
        killing the process during interpreter shutdown, after our handlers are gone."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def drain(self) -> None:
        """Empty the wake-up pipe (its content is only a nudge; the state is in the attributes)."""
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass



def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except OSError:
        pass


def kill_job(pid: int, signum: int) -> None:
    """Send ``signum`` to job child ``pid``'s whole process group (it leads one: ``child.setup``), so processes the
    job started go with it; to the child alone if the group is not there yet. Async-signal-safe (the watchdog)."""
    try:
        os.killpg(pid, signum)
        return
    except OSError:
        pass
    try:
        os.kill(pid, signum)
    except OSError:
        pass  # already gone; the fork server's exit frame will tell how


def _signame(signum) -> str:
    try:
        return signal.Signals(signum).name
    except (ValueError, TypeError):
        return str(signum)
