"""Run a command and report the CPU time of its WHOLE process tree, orphans included (Linux).

    python bench/tree_rusage.py OUT.json COPIES -- argv...

Starts COPIES copies of ``argv`` and waits for all of them. It is a child subreaper (``PR_SET_CHILD_SUBREAPER``):
a process whose parent exits before reaping it (a fork server's spare child, a pool's stray worker) is reparented
here instead of to init, and reaped here too. So ``getrusage(RUSAGE_CHILDREN)`` at the end counts every process that
ran below it: the direct children, everything they reaped (the kernel adds a reaped child's own RUSAGE_CHILDREN
totals to its parent's), and every orphan. Its own CPU is not counted.

Writes JSON to OUT: wall seconds from the first spawn to the last copy's exit, exit codes, user/sys CPU of the
copies as reaped (``wait4``), the same for the whole tree, and how many orphans were reaped.
SIGTERM/SIGINT are forwarded to the copies.
"""
import ctypes
import json
import os
import resource
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def _kill_children(me: int) -> None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                if int(stat[stat.rindex(")") + 2:].split()[1]) == me:
                    os.kill(int(entry), signal.SIGKILL)
            except (OSError, ValueError):
                pass


def main() -> int:
    out, copies, sep, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    assert sep == "--" and argv
    libc = ctypes.CDLL(None, use_errno=True)
    subreaper = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    t0 = time.monotonic()
    pids = [os.posix_spawnp(argv[0], argv, os.environ) for _ in range(copies)]

    def forward(signum, frame):
        for p in pids:
            try:
                os.kill(p, signum)
            except OSError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes, main_user, main_sys, orphans = {}, 0.0, 0.0, 0
    while len(codes) < len(pids):
        pid, status, ru = os.wait4(-1, 0)
        if pid in pids:
            codes[pid] = os.waitstatus_to_exitcode(status)
            main_user += ru.ru_utime
            main_sys += ru.ru_stime
        else:
            orphans += 1
    wall = time.monotonic() - t0
    deadline = time.monotonic() + 10.0  # orphans still running: give them 10 s, then kill them
    while True:
        try:
            pid, _, _ = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid:
            orphans += 1
            continue
        if time.monotonic() > deadline:
            _kill_children(os.getpid())
            deadline = float("inf")
        time.sleep(0.01)
    total = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out, "w") as f:
        json.dump({"wall": wall, "codes": [codes[p] for p in pids], "subreaper": subreaper, "orphans": orphans,
                   "main_user": main_user, "main_sys": main_sys,
                   "tree_user": total.ru_utime, "tree_sys": total.ru_stime}, f)
    return max((abs(c) for c in codes.values()), default=0)


if __name__ == "__main__":
    sys.exit(main())
