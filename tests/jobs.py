"""Jobs used by the test suite (JOB_MODULES=worker.sample,tests.jobs).

They report to Redis lists so tests can BLPOP events instead of sleeping. The connection is the job's own (made in
the child from REDIS_URL, a cluster client with REDIS_CLUSTER, or EVENTS_REDIS_URL when a test puts a proxy between
the worker and Redis and still wants to hear from its jobs directly): that is test code, not the runtime.
"""
import ctypes
import json
import os
import signal
import struct
import sys
import time

import redis

from worker import TermException, job, shutdown_requested

_conn = {}


def r():
    pid = os.getpid()
    if pid not in _conn:
        _conn.clear()
        url = os.environ.get("EVENTS_REDIS_URL")
        if url:
            _conn[pid] = redis.Redis.from_url(url, decode_responses=True)
        elif os.environ.get("REDIS_CLUSTER", "").lower() in ("1", "true", "yes", "on"):  # the suites' cluster runs
            _conn[pid] = ClusterEvents(os.environ["REDIS_URL"])
        else:
            _conn[pid] = redis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)
    return _conn[pid]


class ClusterEvents:
    """The job's connection in the suites' cluster runs: each call goes to the plain client of the node that holds
    its (first) key's slot, from one CLUSTER SLOTS read (again after a MOVED). Not redis-py's RedisCluster: it parses
    the COMMAND table as it starts (0.1-0.3 s in every job child), and a TermException landing inside one of its
    calls could leave its connection with an unread reply (a plain client drops it)."""

    def __init__(self, url):
        self.url, self.nodes, self.ranges = url, {}, []
        self._read_slots()

    def _read_slots(self):
        seed = self._node(self.url)
        self.ranges = [(int(start), int(end), f"redis://{primary[0]}:{primary[1]}/0")
                       for start, end, primary, *_ in seed.execute_command("CLUSTER SLOTS")]

    def _node(self, url):
        if url not in self.nodes:
            self.nodes[url] = redis.Redis.from_url(url, decode_responses=True)
        return self.nodes[url]

    def _call(self, name, key, *args, **kwargs):
        from redis.crc import key_slot
        if isinstance(key, (list, tuple)):  # blpop([key, ...], timeout): the keys share a slot, or it is an error
            key = key[0]
        for attempt in (0, 1):
            slot = key_slot(key.encode() if isinstance(key, str) else key)
            url = next(u for start, end, u in self.ranges if start <= slot <= end)
            try:
                return getattr(self._node(url), name)(*args, **kwargs)
            except redis.ResponseError as exc:
                if attempt or not str(exc).startswith("MOVED"):
                    raise
                self._read_slots()

    def eval(self, script, numkeys, *keys_and_args):
        return self._call("eval", keys_and_args[0], script, numkeys, *keys_and_args)

    def __getattr__(self, name):  # single-key commands: rpush, incr, get, lrange, exists...
        return lambda key, *args, **kwargs: self._call(name, key, key, *args, **kwargs)


def event(key, kind, **fields):
    r().rpush(key, json.dumps({"event": kind, "t": time.time(), "pid": os.getpid(), **fields}))


@job
def push(key, value):
    r().rpush(key, value)


@job
def fail(message="boom"):
    raise ValueError(message)


@job
def exit_with(code):
    os._exit(code)


@job
def kill_self(signame):
    os.kill(os.getpid(), getattr(signal, signame))
    time.sleep(5)


@job
def segfault():
    ctypes.string_at(0)


@job
def term_probe(key, seconds=60, cleanup=0.0, swallow=False):
    """Announce the start, then wait; on TermException record it, clean up ``cleanup`` s, return (or keep
    running forever if ``swallow``). Every TermException seen is recorded, so tests can count them."""
    event(key, "started")
    try:
        deadline = time.time() + seconds
        while time.time() < deadline:
            time.sleep(0.05)
        event(key, "completed")
        return
    except TermException:
        event(key, "term", shutdown=shutdown_requested())
    end = time.time() + cleanup
    while swallow or time.time() < end:
        try:
            time.sleep(0.05)
        except BaseException as exc:  # noqa: B902 - counting every exception delivered during cleanup
            event(key, "term_again", type=type(exc).__name__)
    event(key, "cleaned")


@job
def stubborn(key):
    """Swallows everything (BaseException included) and never ends on its own."""
    event(key, "started")
    while True:
        try:
            time.sleep(0.05)
        except BaseException as exc:  # noqa: B902
            event(key, "swallowed", type=type(exc).__name__)


class _SlowFinalizer:
    def __init__(self, key):
        self.key = key

    def __del__(self):
        event(self.key, "finalizing")
        end = time.time() + 30
        while time.time() < end:  # a TermException raised here is dropped by Python ("Exception ignored in")
            time.sleep(0.01)


@job
def term_in_finalizer(key, seconds=30):
    """Waits inside an object's ``__del__``, where the stop lands; then in the job itself. The TermException the
    finalizer dropped must reach the job."""
    try:
        obj = _SlowFinalizer(key)
        del obj
        event(key, "after_finalizer")
        end = time.time() + seconds
        while time.time() < end:
            time.sleep(0.01)
    except TermException:
        event(key, "term")
        raise


@job
def wait_shutdown_flag(key, seconds=30):
    """Reports when shutdown_requested() turns true (for TERM_GRACE), then whether TermException came."""
    event(key, "started")
    try:
        end = time.time() + seconds
        while time.time() < end:
            if shutdown_requested():
                event(key, "flag")
                break
            time.sleep(0.01)
        while time.time() < end:
            time.sleep(0.01)
    except TermException:
        event(key, "term")
        raise


@job(timeout=1)
def too_slow(key):
    event(key, "started")
    time.sleep(30)


@job(retries=2)
def flaky(key, failures):
    """Fails ``failures`` times (counted in Redis), then succeeds."""
    n = r().incr(key + ":count")
    if n <= failures:
        raise RuntimeError(f"failure {n}")
    event(key, "done", attempt=n)


@job(queue="high")
def on_high(key, value):
    r().rpush(key, value)


# --- concurrency, recovery and fork-server tests (tests/test_concurrency.py, test_recovery.py, test_forkserver.py) ---

@job
def cc_span(key, tag, seconds=0.5, again=None):
    """Records ``start`` and ``end`` (with its pid and ``tag``) around a sleep of ``seconds``, so tests can see two
    runs of one job overlap. Runs are counted per tag; with ``again`` set, later runs sleep that long instead."""
    n = r().incr(f"{key}:runs:{tag}")
    event(key, "start", tag=tag, run=n)
    time.sleep(seconds if n == 1 or again is None else again)
    event(key, "end", tag=tag, run=n)


@job
def cc_alloc(key, mb, hold=30.0):
    """Allocates ``mb`` MB and writes every page (private memory, not the fork server's shared pages), then holds it."""
    event(key, "started")
    buf = bytearray(mb * 1024 * 1024)
    for i in range(0, len(buf), 4096):
        buf[i] = 1
    event(key, "allocated")
    time.sleep(hold)
    del buf


@job
def cc_alloc_in_subprocess(key, mb, hold=30.0):
    """Has a subprocess allocate ``mb`` MB (every page written) and hold it: the job's own memory stays small."""
    import subprocess
    import sys
    code = f"import time; b = bytearray({mb} << 20); b[::4096] = b'\\1' * len(b[::4096]); print(1, flush=True); time.sleep({hold})"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    event(key, "spawned", child=p.pid)  # before the allocation: the memory kill may come before "allocated"
    p.stdout.readline()
    event(key, "allocated", child=p.pid)
    p.wait()


@job
def print_tail(text, flush_s=0.5):
    """Leaves ``text`` for the runtime's final flush of stdout, and makes that flush take ``flush_s`` (a slow pipe,
    a log shipper behind it)."""
    import sys

    class SlowOut:
        def __init__(self, out):
            self.out = out

        def write(self, data):
            return len(data)

        def flush(self):
            time.sleep(flush_s)
            self.out.write(text + "\n")
            self.out.flush()

    sys.stdout = SlowOut(sys.stdout)


@job
def cc_subprocess(key, seconds=60.0):
    """Starts ``sleep 300`` (a subprocess the job owns), reports its pid, then blocks."""
    import subprocess
    p = subprocess.Popen(["sleep", "300"])
    event(key, "started", child=p.pid)
    time.sleep(seconds)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@job
def cc_helpers(key, seconds=60.0):
    """Leaves two helpers outside its process group: ``sleep 300`` in a session of its own
    (``start_new_session=True``) and a double-forked daemon (``sleep 301``: setsid, fork, the middle process exits).
    Reports their pids, and which helpers of earlier runs of the same key are still alive, then sleeps."""
    import subprocess
    earlier = [int(p) for p in r().lrange(key + ":helpers", 0, -1)]
    session = subprocess.Popen(["sleep", "300"], start_new_session=True)
    rd, wr = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.setsid()
            daemon = os.fork()
            if daemon == 0:
                os.execvp("sleep", ["sleep", "301"])
            os.write(wr, str(daemon).encode())
        finally:
            os._exit(0)
    os.waitpid(middle, 0)
    daemon = int(os.read(rd, 32))
    r().rpush(key + ":helpers", session.pid, daemon)
    event(key, "started", helpers=[session.pid, daemon], survivors=[p for p in earlier if _alive(p)])
    time.sleep(seconds)
    return "ok"


@job
def cc_pid(key):
    """Records its pid and returns."""
    event(key, "ran")


@job
def cc_probe(key, pids, mb=0):
    """Records which of ``pids`` still exist (not even reaped: no /proc entry), then returns; with ``mb``, first
    holds that many MiB of its own (a child that takes a while to tear down when killed) and sleeps."""
    event(key, "probe", present=[p for p in pids if os.path.exists(f"/proc/{p}")])
    if mb:
        hold = bytearray(mb << 20)
        for i in range(0, len(hold), 4096):
            hold[i] = 1
        event(key, "holding")
        time.sleep(60)


# --- the job's own process: its report, what it leaves behind, its fork server (tests/test_child.py,
# tests/test_forkserver.py) ---

def nested_list(n):
    value = []
    for _ in range(n - 1):
        value = [value]
    return value


@job
def deep_return(key, depth=5000):
    """Returns a list nested ``depth`` deep (JSON the job itself can encode with its raised recursion limit)."""
    sys.setrecursionlimit(20000)
    event(key, "started")
    return nested_list(depth)


@job
def forged_report(key, body='{"status":"error","type":5}'):
    """Writes a report frame of its own making to the report pipe and leaves."""
    from worker import child
    event(key, "started")
    data = body.encode()
    os.write(child._state.report_fd, struct.pack(">cI", b"R", len(data)) + data)
    os._exit(0)


@job
def sleep_then_return(key, seconds=1.0):
    event(key, "started")
    time.sleep(seconds)
    event(key, "ended")
    return "slept"


@job
def blob(key, blob):
    event(key, "ran", n=len(blob))


@job
def leaves_a_sleep(key):
    """Starts ``sleep 77`` and returns at once, leaving it running."""
    import subprocess
    p = subprocess.Popen(["sleep", "77"])
    r().rpush(key, str(p.pid))


@job
def forks_a_helper(key, seconds=1.0, how="exit"):
    """Forks a helper process that leaves through the runtime (``sys.exit(0)``, or returning from the job function),
    then works on for ``seconds`` and returns "parent": the helper must not end the job with a report of its own."""
    event(key, "start")
    if os.fork() == 0:
        if how == "exit":
            sys.exit(0)
        return "helper"
    time.sleep(seconds)
    event(key, "end")
    return "parent"


@job
def leaves_sleep_and_stalls_server(key):
    """Leaves ``sleep 300`` in its process group, stops its fork server (a stall), and returns ok."""
    import signal
    import subprocess
    p = subprocess.Popen(["sleep", "300"])
    event(key, "started", child=p.pid, server=os.getppid())
    os.kill(os.getppid(), signal.SIGSTOP)


@job
def hanging_flush(key):
    """Does its work, then leaves a stdout whose flush never returns (a stalled log pipe behind a custom stream)."""
    class Stuck:
        def write(self, data):
            return len(data)

        def flush(self):
            time.sleep(3600)

    event(key, "work-done")
    sys.stdout = Stuck()
