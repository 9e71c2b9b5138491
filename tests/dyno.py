"""An emulator of the platform side of a shutdown: Heroku's dyno manager, foreman, and a terminal's Ctrl-C.

    report = shutdown(worker_pid, window=10)                        # Heroku: SIGTERM to every process, SIGKILL at 10 s
    report = shutdown(worker_pid, times=3, interval=0.2)            # Heroku repeating its SIGTERM
    report = shutdown(worker_pid, mode="parent")                    # foreman: SIGTERM to its direct child only
    report = shutdown(worker_pid, mode="group", signum=SIGINT)      # Ctrl-C: SIGINT to the foreground group

Every mode then waits until every process it knows of is gone or the window ends, SIGKILLs the survivors at the
window (Heroku's R12) and returns a :class:`Report`. Processes are found by walking parent pids in ``/proc`` (so a
child that called ``setsid`` still counts, as it does for Heroku, which signals the whole dyno), and each one is
watched through a pidfd: the exit time is the kernel's, not a polling interval's.

Used by tests/test_shutdown.py and bench/shutdown.py. Linux only (``/proc``, ``pidfd_open``).
"""
from __future__ import annotations

import os
import select
import signal
import time
from dataclasses import dataclass, field
from typing import Optional

RESCAN = 0.1  # seconds between /proc walks for processes forked after the first signal (each walk costs ~ms)


def _stat(pid: int) -> Optional[tuple]:
    """``(state, ppid, pgid, starttime, session)`` of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19]), int(fields[3])


def alive(pid: int) -> bool:
    """True while ``pid`` exists and has not exited (a zombie has exited: it only waits to be reaped)."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _walk() -> tuple:
    """One walk of /proc: ``({ppid: [pid, ...]}, {session: [pid, ...]})`` of every live process."""
    children, sessions = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and st[0] not in ("Z", "X"):
                children.setdefault(st[1], []).append(int(entry))
                sessions.setdefault(st[4], []).append(int(entry))
    return children, sessions


def tree(*roots: int, session: Optional[int] = None) -> list:
    """The live ones of ``roots`` and every live process below them, found by parent pid; with ``session``, also
    every process of that session (an orphan whose parent died before we saw it is reparented out of the tree,
    but it keeps its session unless it called setsid)."""
    children, sessions = _walk()
    out = [p for p in roots if alive(p)] + (sessions.get(session, []) if session is not None else [])
    todo = list(roots)
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return list(dict.fromkeys(out))


def sleeping(root: int) -> list:
    """Processes below ``root`` blocked in a sleep call (``time.sleep``), per ``/proc/PID/wchan``.

    A job that reports "started" on a socket and then sleeps is only safely inside its ``try`` once it sleeps: a
    signal that lands while it still reads the reply to its report raises outside the ``try``."""
    out = []
    for pid in tree(root):
        if pid == root:
            continue
        try:
            with open(f"/proc/{pid}/wchan") as f:
                if "nanosleep" in f.read():
                    out.append(pid)
        except OSError:
            pass
    return out


@dataclass
class Report:
    mode: str
    window: float
    signal_wall: float = 0.0            # time.time() just before the first signal (compare with a job's clock)
    signal_mono: float = 0.0            # time.monotonic() of the same moment
    sent: list = field(default_factory=list)     # (seconds after the first signal, pid, signal name)
    pids: list = field(default_factory=list)     # every process seen, in order of discovery
    exits: dict = field(default_factory=dict)    # pid -> seconds after the first signal it was seen gone
    killed: list = field(default_factory=list)   # pids still alive at the window, SIGKILLed

    @property
    def sigkilled(self) -> bool:
        """The platform had to SIGKILL something: the worker overran the window (Heroku's R12)."""
        return bool(self.killed)

    @property
    def last_exit(self) -> Optional[float]:
        """Seconds from the first signal until the last process was gone (None if nothing was ever seen)."""
        return max(self.exits.values()) if self.exits else None

    def __str__(self):
        last = f"{self.last_exit:.3f}s" if self.last_exit is not None else "-"
        return (f"Report(mode={self.mode} window={self.window}s pids={self.pids} last_exit={last} "
                f"killed={self.killed} sent={[(round(t, 3), p, s) for t, p, s in self.sent]})")


class _Watch:
    """The set of processes under watch, each with a pidfd so ``select`` wakes the moment one exits."""

    def __init__(self, report: Report, session: Optional[int]):
        self.report, self.session = report, session
        self.fds = {}   # pid -> pidfd (live ones only)
        self.ids = {}   # pid -> starttime, so a reused pid is never taken for ours

    def add(self, pids) -> None:
        for pid in pids:
            if pid in self.fds or pid in self.report.exits:
                continue
            st = _stat(pid)
            if st is None or st[0] in ("Z", "X"):
                continue
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            self.fds[pid], self.ids[pid] = fd, st[3]
            self.report.pids.append(pid)

    def rescan(self) -> None:
        """Pick up processes forked since the last look (children of anything we watch)."""
        if self.fds or self.session is not None:
            self.add(tree(*self.fds, session=self.session))

    def live(self) -> list:
        return list(self.fds)

    def wait(self, timeout: float) -> None:
        """Sleep until a watched process exits or ``timeout`` passes; record exits."""
        if self.fds:
            ready, _, _ = select.select(list(self.fds.values()), [], [], max(0.0, timeout))
        else:
            ready = []
        for pid, fd in list(self.fds.items()):
            st = _stat(pid)
            if fd in ready or st is None or st[0] in ("Z", "X") or st[3] != self.ids[pid]:
                self.gone(pid)

    def gone(self, pid: int) -> None:
        self.report.exits[pid] = time.monotonic() - self.report.signal_mono
        os.close(self.fds.pop(pid))

    def send(self, pid: int, signum: int) -> None:
        if pid not in self.fds:
            return
        try:
            signal.pidfd_send_signal(self.fds[pid], signum)  # race-free: never hits a reused pid
        except ProcessLookupError:
            return
        self.report.sent.append((time.monotonic() - self.report.signal_mono, pid, signal.Signals(signum).name))

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def shutdown(root: int, *, mode: str = "dyno", signum: Optional[int] = None, window: float = 10.0,
             times: int = 1, interval: float = 0.5) -> Report:
    """Stop the process tree under ``root`` the way a platform does, and report how it went.

    ``mode``: ``"dyno"`` signals every process in the tree (Heroku), ``"parent"`` only ``root`` (foreman, or a
    process manager that is itself ``root``), ``"group"`` sends one ``killpg`` to root's process group (a terminal's
    Ctrl-C; root must lead its own group). ``signum`` defaults to SIGINT for ``"group"`` and SIGTERM otherwise.
    The signal is repeated ``times`` times, ``interval`` seconds apart (never past the window). At ``window``
    seconds after the first signal every survivor is SIGKILLed.
    """
    if mode not in ("dyno", "parent", "group"):
        raise ValueError(f"unknown mode {mode!r}")
    signum = signum if signum is not None else (signal.SIGINT if mode == "group" else signal.SIGTERM)
    report = Report(mode=mode, window=window)
    # A root that leads its own session (a dyno's process, a worker spawned with setsid) lets us find its orphans.
    watch = _Watch(report, session=root if _stat(root) and _stat(root)[4] == root else None)
    try:
        watch.add(tree(root))
        if mode == "group":
            pgid = os.getpgid(root)
            if pgid == os.getpgrp():
                raise ValueError("root shares our process group: a group signal would hit the caller too")
        report.signal_wall, report.signal_mono = time.time(), time.monotonic()
        deadline = report.signal_mono + window
        next_signal, sent_rounds, next_scan = report.signal_mono, 0, report.signal_mono + RESCAN
        while True:
            now = time.monotonic()
            if sent_rounds < times and now >= next_signal:
                if mode == "dyno":
                    if sent_rounds:  # the first round uses the walk made just before the clock was read
                        watch.rescan()
                    for pid in watch.live():
                        watch.send(pid, signum)
                elif mode == "parent":
                    watch.send(root, signum)
                else:
                    try:
                        os.killpg(pgid, signum)
                        report.sent.append((now - report.signal_mono, -pgid, signal.Signals(signum).name))
                    except ProcessLookupError:
                        pass
                sent_rounds += 1
                next_signal = report.signal_mono + sent_rounds * interval
            if now >= next_scan:
                watch.rescan()
                next_scan = now + RESCAN
            if not watch.live():
                watch.rescan()  # one last look: nothing of the session left behind?
                if not watch.live():
                    return report
            if now >= deadline:
                report.killed = watch.live()
                for pid in report.killed:
                    watch.send(pid, signal.SIGKILL)
                end = time.monotonic() + 5
                while watch.live() and time.monotonic() < end:
                    watch.wait(0.1)
                return report
            wake = min(deadline, next_scan, next_signal if sent_rounds < times else deadline)
            watch.wait(wake - now)
    finally:
        watch.close()


if __name__ == "__main__":  # manual use: python tests/dyno.py PID [MODE] [WINDOW]
    import sys
    args = sys.argv[1:]
    print(shutdown(int(args[0]), mode=args[1] if len(args) > 1 else "dyno",
                   window=float(args[2]) if len(args) > 2 else 10.0))
