"""Helpers shared by the test suite and bench/shutdown.py (plain Python: no pytest import)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import redis

from worker.client import SlotClient

#: The runtime's variables, stripped from spawned workers' environments so a developer's shell cannot change a test.
CONFIG_VARS = ("REDIS_URL", "QUEUES", "JOB_MODULES", "TERM_TIMEOUT", "TERM_GRACE", "SHUTDOWN_WINDOW", "JOB_TIMEOUT",
               "JOB_RETRIES", "MAX_ATTEMPTS", "HEARTBEAT_INTERVAL", "HEARTBEAT_TTL", "FAILED_MAX", "FAILED_TTL",
               "MAX_PAYLOAD_BYTES", "KEY_PREFIX", "LOG_LEVEL", "DYNO", "REDIS_TLS_VERIFY", "REDIS_TIMEOUT",
               "REDIS_CLUSTER", "QUEUE_GROUPS",
               "WORKER_CONCURRENCY", "JOB_MAX_MEMORY_MB", "MAX_INTERRUPTIONS", "RESULT_TTL", "METRICS_INTERVAL",
               "DASHBOARD_PASSWORD", "DASHBOARD_READ_ONLY", "HIREFIRE_TOKEN", "PORT",
               "UNKNOWN_JOB_GRACE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout=15.0, what="condition", proc=None):
    """Poll ``pred`` (a cheap Redis read or /proc look-up: the state change itself is the event waited for) until it
    returns something true, and return that; fail after ``timeout`` seconds (with ``proc``'s output if given)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                 + (f"; worker output:\n{proc.output}" if proc else ""))
        time.sleep(0.02)


_SEEN_LATE = """
for _, w in ipairs(ARGV) do
  local s = redis.call('ZSCORE', KEYS[1], w)
  if s then redis.call('HSET', KEYS[2], w, s .. '@0') end
end"""


def seen_late_long_ago(r, *names) -> None:
    """Mark workers (fakes registered with a past score) as first seen late at the epoch, as a recovery pass long
    ago would have (``lua.RECOVER``): the next pass finds them dead at once instead of giving them their grace."""
    k = keys_of(r)
    r.eval(_SEEN_LATE, 2, k.workers, k.suspects, *names)


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


def redis_down(server) -> None:
    """Take the session's redis-server down as a restart does (``SHUTDOWN SAVE``: the dataset is on disk, every
    connection is refused until :func:`redis_up` brings it back on the same port)."""
    client = redis.Redis(port=server.port)
    try:
        client.shutdown(save=True)
    except redis.ConnectionError:
        pass
    finally:
        client.close()
    server.proc.wait(10)


def redis_up(server) -> None:
    server.start()  # same port; loads the dump written at shutdown
    (server.workdir / "dump.rdb").unlink(missing_ok=True)  # later restarts of the session server start empty


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
        self.broker = Broker(client_for(self.cfg), self.cfg)
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
        raw = r.hget(keys_of(r).failed_data, job_id)
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


# --- helpers the feature files share (one definition each) ---

def _is_cluster(r) -> bool:
    return isinstance(r, SlotClient)


def url_of(r) -> str:
    """The ``redis://`` URL of a client's connection (a TCP client; on a cluster, the first node it was given)."""
    if _is_cluster(r):
        node = r.cluster.get_default_node()
        return f"redis://{node.host}:{node.port}/0"
    kw = r.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}"


def config_of(r, **env):
    """The runtime's Config for the server or cluster client ``r`` talks to (``REDIS_CLUSTER=1`` for a cluster
    client), ``env`` as further variables."""
    import worker.config
    base = {"REDIS_URL": url_of(r), **({"REDIS_CLUSTER": "1"} if _is_cluster(r) else {})}
    return worker.config.from_mapping({**base, **env})


def keys_of(r):
    """The key builder (worker/keys.py, the one key schema) of the key space ``r`` works on: ``worker:...`` on a
    single server, ``{worker}:...`` on a cluster (one hash tag, worker/config.py)."""
    from worker.keys import Keys
    return Keys(config_of(r).key_prefix)


def home(r):
    """The plain client of the node that holds the key space: where per-server commands (CLIENT LIST, INFO,
    CLIENT PAUSE, CONFIG) about the runtime's connections and keys must go. ``r`` itself on a single server."""
    return r.node() if _is_cluster(r) else r


class TestSlotClient(SlotClient):
    """The runtime's SlotClient (worker/client.py) as the tests' ``r`` on a cluster: KEYS, like SCAN, asks the node
    that holds the key space (RedisCluster would ask one node at random)."""

    def keys(self, pattern="*", **kwargs):
        return self.redirected(lambda: self.node().keys(pattern, **kwargs))


def client_for(cfg, **kwargs):
    """A test client (decode_responses, no socket timeout: tests BLPOP for seconds; ``kwargs`` for redis-py) for
    ``cfg``'s Redis: a plain client, or on a cluster a :class:`TestSlotClient` around redis-py's RedisCluster."""
    if cfg.redis_cluster:
        return TestSlotClient(redis.RedisCluster.from_url(cfg.redis_url, decode_responses=True, **kwargs),
                              cfg.key_prefix)
    return redis.Redis.from_url(cfg.redis_url, decode_responses=True, **kwargs)


def make_broker(r, **env):
    """A :class:`worker.fetch.Broker` on client ``r`` (its own server or cluster), ``env`` as further variables."""
    from worker.fetch import Broker
    return Broker(r, config_of(r, **env))


def new_broker(r, socket_timeout=None, **env):
    """Like :func:`make_broker`, on a connection of its own (a second process's view of the same Redis)."""
    from worker.fetch import Broker
    cfg = config_of(r, **env)
    return Broker(client_for(cfg, socket_timeout=socket_timeout), cfg)


def pop(r, key, timeout=15.0):
    """BLPOP in 1 s slices (a longer BLPOP would hit redis-py's socket timeout): the item, or None after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        item = r.blpop(key, 1)
        if item is not None:
            return item[1]
        if time.monotonic() >= deadline:
            return None


def next_event(r, key, timeout=20.0) -> dict:
    """The next event a test job recorded on ``key`` (tests/jobs.py ``event``), consumed; fails on timeout."""
    import json
    item = pop(r, key, timeout)
    assert item is not None, f"no event on {key!r} within {timeout}s"
    return json.loads(item)


def processing(r) -> dict:
    """Processing lists that still hold something (the only place an in-flight job can be)."""
    return {k: r.lrange(k, 0, -1) for k in r.keys(keys_of(r).processing("*")) if r.llen(k)}


def queued_ids(r, queue="default") -> list:
    """The ids of the payloads in a queue, head first."""
    import json
    return [json.loads(p)["id"] for p in r.lrange(keys_of(r).queue(queue), 0, -1)]


def name_of(w) -> str:
    """A spawned worker's name, from its ``worker.start`` line."""
    import re
    return re.search(r"worker=(\S+)", w.wait_for(r"event=worker\.start")).group(1)


def redis_ms(r) -> int:
    """Redis's clock in milliseconds (the clock every deadline is measured on)."""
    sec, usec = r.time()
    return sec * 1000 + usec // 1000



def status_of(r, job_id):
    """A job's status in its status record (``P:job:<id>``), or None."""
    return r.hget(keys_of(r).job(job_id), "status")


def heartbeat(r, name):
    """A worker's last beat (``seen``, Redis ms) from its hash, or None."""
    seen = r.hget(keys_of(r).worker(name), "seen")
    return int(float(seen)) if seen else None


def release(*pids) -> None:
    """Teardown of SIGSTOPped processes: let each go, then kill it (it may already be gone; 0/None are skipped)."""
    import signal
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            if pid:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass


def still_works(r, w, enqueue, tag) -> None:
    """The spawned worker ``w`` is alive and runs a new job (``enqueue``: the conftest fixture)."""
    assert w.popen.poll() is None, f"the worker exited:\n{w.output}"
    enqueue("push", f"alive:{tag}", "yes")
    assert pop(r, f"alive:{tag}", 15) == "yes", f"the worker did not run a later job:\n{w.output}"
    assert w.popen.poll() is None, f"the worker exited:\n{w.output}"


def count(r, key, kind, tag=None) -> int:
    """How many events of ``kind`` (and ``tag``) a test job recorded on ``key`` (not consumed)."""
    return sum(e["event"] == kind and (tag is None or e.get("tag") == tag) for e in events(r, key))


def wait_event(r, key, kind, tag=None, n=1, timeout=20.0) -> None:
    """Wait until ``key`` holds ``n`` events of ``kind`` (and ``tag``), without consuming them."""
    wait_until(lambda: count(r, key, kind, tag) >= n, timeout, f"{n} {kind!r} {tag or ''} on {key}")


def assert_ran_once(r, key, tags) -> None:
    """Each ``tag`` (tests/jobs.py ``cc_span``) ran exactly once, and no two runs of one tag overlapped."""
    evs = events(r, key)
    assert overlaps(evs) == [], f"a job ran twice at once: {overlaps(evs)}"
    got = runs(evs)
    for tag in tags:
        assert len(got.get(tag, [])) == 1, f"{tag} ran {len(got.get(tag, []))} times: {got}"


def job_json(job_id, queue="default", **extra) -> str:
    """A payload of the ``push`` job, as a producer writes it (fields in ``extra`` added or replaced)."""
    import json
    return json.dumps({"id": job_id, "name": "push", "queue": queue, "args": [], "kwargs": {}, **extra})


def queued_loose_ids(r, queue="default") -> list:
    """The ids in a queue, sorted, read as leniently as the runtime reads them (also from hostile payloads)."""
    from worker import jobs
    return sorted(jobs.loose_id(p) for p in r.lrange(keys_of(r).queue(queue), 0, -1))


# --- a local Redis Cluster (issue 26 point 4) ---

class LocalCluster:
    """A real Redis Cluster on loopback ports: ``primaries`` redis-server processes in cluster mode (each with
    ``replicas`` replicas), joined by ``redis-cli --cluster create``; ``start()`` returns once every node reports
    ``cluster_state:ok``. No persistence. ``why_not()`` says why this machine cannot run one (None if it can)."""

    def __init__(self, workdir, primaries: int = 3, replicas: int = 0, tls=None):
        self.workdir = workdir
        self.tls = tls  # (cert, key): TLS only, on every port and the cluster bus (self-signed, not verified)
        self.ports = [_cluster_port() for _ in range(primaries * (1 + replicas))]
        self.replicas = replicas
        self.procs: dict = {}

    @staticmethod
    def why_not():
        if not shutil.which("redis-server"):
            return "redis-server is not installed"
        if not shutil.which("redis-cli"):
            return "redis-cli is not installed (Debian: redis-tools)"
        out = subprocess.run([shutil.which("redis-server"), "--version"], capture_output=True, text=True).stdout
        version = out.split("v=")[1].split()[0] if "v=" in out else "0"
        if int(version.split(".")[0]) < 5:
            return f"redis-server {version} has no `redis-cli --cluster create` (needs 5.0 or newer)"
        return None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.ports[0]}/0"

    def client(self, port: int, **kw) -> redis.Redis:
        if self.tls:
            kw.update(ssl=True, ssl_cert_reqs=None, ssl_check_hostname=False)
        return redis.Redis(port=port, **kw)

    def _tls_args(self, cli: bool = False) -> list:
        if not self.tls:
            return []
        if cli:
            return ["--tls", "--insecure"]
        cert, key = self.tls
        return ["--port", "0", "--tls-port", "{port}", "--tls-cluster", "yes", "--tls-replication", "yes",
                "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                "--tls-auth-clients", "no"]

    def start_node(self, port: int) -> None:
        d = os.path.join(str(self.workdir), str(port))
        os.makedirs(d, exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", d, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", "2000", "--loglevel", "warning",
             *[a.replace("{port}", str(port)) for a in self._tls_args()]],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client(port, socket_connect_timeout=0.2)
        try:
            wait_until(lambda: _pings(client), timeout=10, what=f"cluster node {port} to answer PING")
        finally:
            client.close()

    def start(self) -> "LocalCluster":
        for port in self.ports:
            self.start_node(port)
        subprocess.run([shutil.which("redis-cli"), *self._tls_args(cli=True), "--cluster", "create",
                        *[f"127.0.0.1:{p}" for p in self.ports], "--cluster-replicas", str(self.replicas),
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        self.wait_ok()
        return self

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says ``cluster_state:ok`` and every replica is in sync with its primary."""
        def ok():
            for port, proc in self.procs.items():
                if proc.poll() is not None:
                    continue
                c = self.client(port, socket_connect_timeout=0.5, socket_timeout=2, decode_responses=True)
                try:
                    if c.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                        return False
                    repl = c.info("replication")  # a replica that never synced is never promoted
                    if repl["role"] == "slave" and repl.get("master_link_status") != "up":
                        return False
                    if repl["role"] == "master" and int(repl.get("connected_slaves", 0)) < self.replicas:
                        return False
                except redis.RedisError:
                    return False
                finally:
                    c.close()
            return True
        wait_until(ok, timeout=timeout, what="cluster_state:ok on every node")

    def node_of(self, key: str) -> int:
        """The port of the primary that holds ``key``'s slot (as a live node sees it)."""
        c = self.client(self.live()[0], decode_responses=True)
        try:
            slot = c.execute_command("CLUSTER KEYSLOT", key)
            for start, end, primary, *_ in c.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return int(primary[1])
        finally:
            c.close()
        raise LookupError(key)

    def node_id(self, port: int) -> str:
        c = self.client(port, decode_responses=True)
        try:
            return c.execute_command("CLUSTER MYID")
        finally:
            c.close()

    def migrate_slot(self, key: str, to_port: int, batch: int = 10, between=None) -> int:
        """Move ``key``'s hash slot to the primary on ``to_port`` the way ``redis-cli --cluster reshard`` does:
        IMPORTING/MIGRATING, then MIGRATE of ``batch`` keys at a time (``between()`` runs after each batch) while
        clients get ASK for the keys already moved, then SETSLOT NODE on every primary. Returns the keys moved."""
        src_port = self.node_of(key)
        src, dst = (self.client(p, decode_responses=True) for p in (src_port, to_port))
        try:
            slot = src.execute_command("CLUSTER KEYSLOT", key)
            src_id, dst_id = self.node_id(src_port), self.node_id(to_port)
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
            moved = 0
            while True:
                keys = src.execute_command("CLUSTER GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                src.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "REPLACE", "KEYS", *keys)
                moved += len(keys)
                if between:
                    between()
            for port, proc in self.procs.items():
                if proc.poll() is None:
                    c = self.client(port, decode_responses=True)
                    try:
                        if c.info("replication")["role"] == "master":
                            c.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
                    finally:
                        c.close()
            return moved
        finally:
            src.close()
            dst.close()

    def flush(self) -> None:
        """FLUSHALL on every live primary."""
        for port, proc in self.procs.items():
            if proc.poll() is None:
                c = self.client(port, decode_responses=True)
                try:
                    if c.info("replication")["role"] == "master":
                        c.flushall()
                finally:
                    c.close()

    def live(self) -> list:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def replica_of(self, port: int) -> int:
        """The port of a replica of the primary on ``port``."""
        c = self.client(port, decode_responses=True)
        try:
            return int(c.info("replication")["slave0"]["port"])
        finally:
            c.close()

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        for port in list(self.procs):
            self.kill(port)


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
