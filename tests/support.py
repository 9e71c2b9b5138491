"""Helpers shared by the test suite and bench/shutdown.py (plain Python: no pytest import)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import redis

#: The runtime's variables, stripped from spawned workers' environments so a developer's shell cannot change a test.
CONFIG_VARS = ("REDIS_URL", "QUEUES", "JOB_MODULES", "TERM_TIMEOUT", "TERM_GRACE", "SHUTDOWN_WINDOW", "JOB_TIMEOUT",
               "JOB_RETRIES", "MAX_ATTEMPTS", "HEARTBEAT_INTERVAL", "HEARTBEAT_TTL", "FAILED_MAX", "FAILED_TTL",
               "MAX_PAYLOAD_BYTES", "KEY_PREFIX", "LOG_LEVEL", "DYNO", "REDIS_TLS_VERIFY", "REDIS_TIMEOUT",
               "WORKER_CONCURRENCY", "JOB_MAX_MEMORY_MB", "MAX_INTERRUPTIONS", "RESULT_TTL", "METRICS_INTERVAL",
               "DASHBOARD_PASSWORD", "DASHBOARD_READ_ONLY", "HIREFIRE_TOKEN", "PORT",
               "UNKNOWN_JOB_GRACE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout, what):
    """Poll ``pred`` (a cheap Redis read or /proc look-up) until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


_SEEN_LATE = """
for _, w in ipairs(ARGV) do
  local s = redis.call('ZSCORE', KEYS[1], w)
  if s then redis.call('HSET', KEYS[2], w, s .. '@0') end
end"""


def seen_late_long_ago(r, *names, prefix: str = "worker") -> None:
    """Mark workers (fakes registered with a past score) as first seen late at the epoch, as a recovery pass long
    ago would have (``lua.RECOVER``): the next pass finds them dead at once instead of giving them their grace."""
    r.eval(_SEEN_LATE, 2, f"{prefix}:workers", f"{prefix}:suspects", *names)


def descendants(pid: int) -> list:
    """Every live process below ``pid`` (by parent pid, so children that left the process group count too)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def start_redis_server(port: int, workdir) -> subprocess.Popen:
    """A throw-away redis-server on 127.0.0.1:``port`` (no persistence), returned once it answers PING."""
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir), "--loglevel", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                client.ping()
                return proc
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    proc.kill()
                    proc.wait(10)
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.02)
    finally:
        client.close()


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def forkserver_of(worker_pid: int) -> list:
    """The fork server(s) of a worker: its direct children whose command line runs ``worker.forkserver``."""
    out = []
    for pid in descendants(worker_pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == worker_pid and "worker.forkserver" in cmdline(pid):
            out.append(pid)
    return out


def events(r, key) -> list:
    """Every event a test job recorded on ``key`` (tests/jobs.py ``event``), oldest first, as dicts."""
    import json
    return [json.loads(x) for x in r.lrange(key, 0, -1)]


def runs(evs) -> dict:
    """``{tag: [(start_t, end_t or None, pid), ...]}`` from cc_span's start/end events (matched by pid)."""
    out: dict = {}
    for e in evs:
        if e.get("event") == "start":
            out.setdefault(e["tag"], []).append([e["t"], None, e["pid"]])
        elif e.get("event") == "end":
            for run in out.get(e["tag"], []):
                if run[2] == e["pid"] and run[1] is None:
                    run[1] = e["t"]
    return {tag: [tuple(x) for x in v] for tag, v in out.items()}


def overlaps(evs) -> list:
    """Pairs of runs of one tag that were in flight at the same time (an unfinished run lasts forever)."""
    bad = []
    for tag, rs in runs(evs).items():
        rs = sorted(rs)
        for a, b in zip(rs, rs[1:]):
            if a[1] is None or b[0] < a[1]:
                bad.append((tag, a, b))
    return bad


def client_pause(url: str, ms: int) -> None:
    """``CLIENT PAUSE ms ALL`` from a connection of its own, closed at once (a stalled Redis for everyone else)."""
    c = redis.Redis.from_url(url)
    try:
        c.execute_command("CLIENT", "PAUSE", str(int(ms)), "ALL")
    finally:
        c.close()


class InProcessWorker:
    """A :class:`worker.supervisor.Supervisor` run in the test process (main thread), so a test can wrap its
    broker or slot table and make a stop land at an exact point of the loop. Stops are made by setting what the
    TERM handler sets (``stop_at`` and the wake-up pipe) without arming the watchdog's timer, whose hard exit
    would end the test process. :meth:`close` restores every signal disposition ``run()`` changed and kills the
    fork server if it is still there; call it in a ``finally``."""

    SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGCONT", "SIGCHLD", "SIGALRM")

    def __init__(self, url: str, **env):
        import io

        import worker.config
        from worker.fetch import Broker
        from worker.log import Logger
        from worker.supervisor import Supervisor
        self.cfg = worker.config.from_mapping({"REDIS_URL": url, "JOB_MODULES": "worker.sample,tests.jobs",
                                               "SHUTDOWN_WINDOW": "2", **env})
        self.broker = Broker(redis.Redis.from_url(url, decode_responses=True), self.cfg)
        self.stream = io.StringIO()
        self.sup = Supervisor(self.cfg, self.broker, Logger("DEBUG", stream=self.stream))
        import signal
        self._saved = {name: signal.getsignal(getattr(signal, name)) for name in self.SIGNALS}

    @property
    def output(self) -> str:
        return self.stream.getvalue()

    def stop(self) -> None:
        """What ``SignalState._on_stop`` does for a first SIGTERM, minus the watchdog timer."""
        import signal
        sig = self.sig
        sig.stop_count += 1
        if sig.stop_at is None:
            sig.stop_at, sig.stop_signal = time.monotonic(), signal.SIGTERM
        os.write(sig._wake_w, b"\x0f")

    @property
    def sig(self):
        return self.sup.sig

    def run(self) -> int:
        return self.sup.run()

    def close(self) -> None:
        import signal
        signal.set_wakeup_fd(-1)
        for name, handler in self._saved.items():
            signal.signal(getattr(signal, name), handler if handler is not None else signal.SIG_DFL)
        for fd in (self.sig.wake_r, self.sig._wake_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.sup.slots.forks.kill()
        self.sup.waiter.close()
        self.broker.r.close()


def failure(r, job_id, timeout=15.0) -> dict:
    """The failure record of ``job_id`` once written (the log line comes first: the record is written by the
    worker's next Redis call)."""
    import json
    deadline = time.monotonic() + timeout
    while True:
        raw = r.hget("worker:failed:data", job_id)
        if raw:
            return json.loads(raw)
        assert time.monotonic() < deadline, f"no failure record for {job_id}"
        time.sleep(0.02)


def children(pid: int) -> list:
    """Live direct children of ``pid`` (by parent pid in /proc)."""
    return [c for c in descendants(pid) if _ppid(c) == pid]


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return -1
    return int(stat[stat.rindex(")") + 2:].split()[1])
