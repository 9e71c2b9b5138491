"""Redis outages: the worker outlives them and loses nothing.

Redis is taken down the way a restart does it (``SHUTDOWN SAVE``: the dataset is on disk, every connection is
refused until it comes back on the same port and reloads it). A plain SIGKILL of this suite's non-persistent
redis-server would also erase the queues, which no worker can survive; what is under test is the worker's side.
The jobs here write to a file, not to Redis, so an outage only touches the runtime's own bookkeeping.

``OUTAGE_SECONDS`` (default 30, the issue's figure) sets the long outage; those tests are marked ``slow``. Then a
stall rather than an outage (Redis stops answering for longer than REDIS_TIMEOUT while a call is in flight), a stop
while Redis is unreachable, a failover (READONLY from a node that became a replica) and Redis losing its data (a
restart without persistence) under a running job.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
import redis

import worker.config
from worker import client
from worker.fetch import Broker

import tests.jobs_term  # noqa: F401  (registers the tt_ jobs for Broker.push)
from tests import dyno
from tests.support import (count, free_port, name_of, next_event, processing, redis_down, redis_up,
                           start_redis_server, wait_event, wait_until)

MODULES = "worker.sample,tests.jobs,tests.jobs_chaos"
OUTAGE = float(os.environ.get("OUTAGE_SECONDS", "30"))
FAST = {"HEARTBEAT_INTERVAL": "0.5", "HEARTBEAT_TTL": "2", "JOB_MODULES": MODULES}
TERM_MODULES = "worker.sample,tests.jobs,tests.jobs_term"
QUEUE = "worker:queue:default"
WORKERS = "worker:workers"


def lines(path) -> list:
    try:
        with open(path) as f:
            return [line.split() for line in f if line.strip()]
    except FileNotFoundError:
        return []


def done_tags(path) -> list:
    return [parts[1] for parts in lines(path) if parts[0] == "done"]


@pytest.fixture
def broker(redis_server, r):
    b = Broker(redis.Redis.from_url(redis_server.url, decode_responses=True),
               worker.config.from_mapping({"REDIS_URL": redis_server.url}))
    yield b
    b.r.close()


@pytest.mark.slow
@pytest.mark.timeout(int(OUTAGE) + 120)
def test_busy_worker_survives_an_outage_and_records_everything(r, spawn, broker, redis_server, tmp_path):
    path = str(tmp_path / "notes")
    w = spawn(JOB_MODULES=MODULES)
    tags = [f"j{i}" for i in range(60)]
    for tag in tags:
        broker.push("nl_note", [path, tag, 0.2], {})
    wait_until(lambda: len(done_tags(path)) >= 10 and lines(path)[-1][0] == "start", 60, "a job in progress")
    redis_down(redis_server)  # mid-job: its outcome cannot be recorded until Redis is back
    down_at = time.monotonic()
    in_progress = lines(path)[-1][1]

    while time.monotonic() - down_at < OUTAGE:  # the outage lasts OUTAGE seconds; the worker must stay up
        assert w.popen.poll() is None, f"worker died during the outage:\n{w.output}"
        time.sleep(0.5)
    during = lines(path)
    assert [p[1] for p in during if p[0] == "start"].count(in_progress) == 1
    assert during[-1] == ["done", in_progress, during[-2][2]], "nothing is claimed while Redis is down"
    w.wait_for(r"event=redis\.unavailable")
    redis_up(redis_server)
    w.wait_for(r"event=redis\.reconnected", timeout=20)
    print(f"\noutage of {OUTAGE:.0f}s: worker reconnected "
          f"{time.monotonic() - down_at - OUTAGE:.1f}s after Redis came back")

    wait_until(lambda: set(done_tags(path)) == set(tags), 90, "every job done")
    wait_until(lambda: r.llen("worker:queue:default") == 0 and processing(r) == {}, 20, "nothing in flight")
    done = done_tags(path)
    assert int(r.get("worker:stat:processed")) == len(tags)  # each acknowledged once, even if it ran twice
    print(f"{len(tags)} jobs, {len(done) - len(set(done))} ran twice, 0 lost")
    assert w.popen.poll() is None
    w.signal(signal.SIGTERM)
    assert w.wait(10) == 0, w.output


def _term_during_outage(w):
    """SIGTERM the worker while Redis is down; it must be gone inside the 4 s window. Returns the exit time."""
    sent = time.monotonic()
    w.signal(signal.SIGTERM)
    code = w.wait(10)
    took = time.monotonic() - sent
    print(f"\nSIGTERM during an outage: worker exited {code} after {took:.2f}s (SHUTDOWN_WINDOW=4)")
    assert took < 4.0, w.output
    assert code in (0, 3), w.output  # 3 = the watchdog's hard exit, also inside the window
    return took


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_the_worker_waits_quietly_through_an_outage(r, spawn, redis_server):
    """Between attempts to reconnect (redis-py's backoff, up to 5 s) the loop sleeps. A heartbeat that fell due
    while Redis was down used to make every wait time out at once: 100% of a core until the next attempt (found
    on a worker an interrupted benchmark left behind, spinning for half an hour)."""
    w = spawn(**FAST)
    w.wait_for(r"event=worker\.start")
    wait_until(lambda: r.zcard("worker:workers") == 1, 10, "the worker registered")
    redis_down(redis_server)
    try:
        w.wait_for(r"event=redis\.unavailable")
        before, t0 = cpu_seconds(w.pid), time.monotonic()
        time.sleep(4)  # the window measured: several beats fall due, a few reconnect attempts are made
        used, took = cpu_seconds(w.pid) - before, time.monotonic() - t0
    finally:
        redis_up(redis_server)
    assert used < 0.25 * took, f"{used:.2f} CPU-s in {took:.1f} s of outage: the loop spins\n{w.output}"
    w.wait_for(r"event=redis\.reconnected")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_after_an_outage_the_worker_is_back_within_its_interval(r, spawn, redis_server):
    """Others give a late worker its interval + 1 s (lua.RECOVER) from when they first see it late, right after
    Redis comes back. A worker in redis-py's backoff could wait up to 5 s before its next attempt, and its job
    was recovered and run twice at once (reproduced with HEARTBEAT_INTERVAL=0.2 and a 6 s CLIENT PAUSE); it now
    tries at least once per interval."""
    w = spawn(HEARTBEAT_INTERVAL="0.2", HEARTBEAT_TTL="1", JOB_MODULES=MODULES)
    w.wait_for(r"event=worker\.start")
    wait_until(lambda: r.zcard("worker:workers") == 1, 10, "the worker registered")
    redis_down(redis_server)
    try:
        w.wait_for(r"event=redis\.unavailable")
        time.sleep(6)  # long enough for the backoff to grow to its 5 s cap
    finally:
        redis_up(redis_server)
    back = time.monotonic()
    w.wait_for(r"event=redis\.reconnected")
    took = time.monotonic() - back
    assert took < 1.2, f"back {took:.2f} s after Redis was: past the grace others give (0.2 s + 1 s)"


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_sigterm_during_outage_with_a_running_job(r, spawn, broker, redis_server, tmp_path):
    path = str(tmp_path / "notes")
    w1 = spawn(SHUTDOWN_WINDOW="4", **FAST)
    w1_name = f"{socket.gethostname()}:{w1.pid}"
    job_id = broker.push("nl_note", [path, "long", 0.0, 60.0], {})  # 60 s on its first run, instant after
    wait_until(lambda: lines(path), 20, "the job's start")
    redis_down(redis_server)
    _term_during_outage(w1)
    assert done_tags(path) == [], "the interrupted job did not complete"

    redis_up(redis_server)
    held = r.lrange(f"worker:processing:{w1_name}", 0, -1)
    assert len(held) == 1 and job_id in held[0], "the unacknowledged job stayed in the dead worker's list"
    w2 = spawn(SHUTDOWN_WINDOW="4", **FAST)
    wait_until(lambda: done_tags(path) == ["long"], 30, "the job recovered and run by another worker")
    w2.wait_for(rf"event=recovery\.requeued job={job_id}")
    wait_until(lambda: processing(r) == {} and r.llen("worker:queue:default") == 0, 20, "nothing in flight")


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_sigterm_during_outage_with_an_unrecorded_outcome(r, spawn, broker, redis_server, tmp_path):
    """The job finished while Redis was down; the worker held its outcome and was waiting to reconnect when the
    SIGTERM came. It exits in time; the job, never acknowledged, runs again elsewhere (at least once)."""
    path = str(tmp_path / "notes")
    w1 = spawn(SHUTDOWN_WINDOW="4", **FAST)
    job_id = broker.push("nl_note", [path, "quick", 1.0], {})
    wait_until(lambda: lines(path), 20, "the job's start")
    redis_down(redis_server)
    wait_until(lambda: done_tags(path) == ["quick"], 20, "the job's end")
    w1.wait_for(r"event=redis\.unavailable")
    _term_during_outage(w1)

    redis_up(redis_server)
    w2 = spawn(SHUTDOWN_WINDOW="4", **FAST)
    wait_until(lambda: done_tags(path) == ["quick", "quick"], 30, "the job run again by another worker")
    w2.wait_for(rf"event=recovery\.requeued job={job_id}")
    wait_until(lambda: processing(r) == {} and r.llen("worker:queue:default") == 0, 20, "nothing in flight")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_redis_stall_during_record_and_claim_strands_no_job(r, spawn, broker):
    """Redis stalls for 3 s while the worker's record-and-claim script is in flight; with REDIS_TIMEOUT=1 the call
    times out and is sent again. The first, unanswered call still runs when Redis resumes, so whatever it claimed
    must not be stranded: every job runs, and nothing stays in the (live) worker's processing list."""
    broker.push("nl_stall_redis", [3], {})
    for i in range(3):
        broker.push("push", ["out", str(i)], {})
    w = spawn(JOB_MODULES=MODULES, REDIS_TIMEOUT="1")
    deadline = time.monotonic() + 30
    while not (sorted(r.lrange("out", 0, -1)) == ["0", "1", "2"] and processing(r) == {}
               and r.llen("worker:queue:default") == 0):
        assert time.monotonic() < deadline, (
            f"after the stall: ran {r.lrange('out', 0, -1)}, queue {r.lrange('worker:queue:default', 0, -1)}, "
            f"processing lists {processing(r)}\n{w.output}")
        time.sleep(0.1)
    assert w.popen.poll() is None


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_burst_worker_gives_up_after_max_outage(spawn):
    """Issue 21 item 2: `--burst` (CI, a one-off dyno) retried an unreachable Redis for ever. It exits 1 after
    --max-outage seconds (default 60, in --help), saying where it tried (password masked) and why it gave up."""
    from tests.support import free_port
    url = f"redis://:hunter2pw@127.0.0.1:{free_port()}/0"
    w = spawn("--burst", "--max-outage", "1.5", REDIS_URL=url)
    assert w.wait(30) == 1, w.output
    fatal = w.wait_for(r"worker\.fatal")
    assert "unreachable" in fatal and "--max-outage 1.5" in fatal and f"127.0.0.1" in fatal, fatal
    assert "hunter2pw" not in w.output
    h = spawn("run", "--help", REDIS_URL=url)
    assert h.wait(30) == 0 and "--max-outage" in h.output and "default 60" in h.output, h.output


# --- a stop while Redis is unreachable ---

class BlackholeProxy:
    """A TCP proxy to Redis on a listen backlog of 0. :meth:`blackhole` makes Redis unreachable the slow way: the
    proxy stops accepting, two idle connections fill its accept queue (so the kernel drops every new SYN: a connect
    hangs until its timeout), and every proxied connection is closed (so the worker must reconnect)."""

    def __init__(self, port: int):
        self.target = port
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(0)
        self.port = self.lsock.getsockname()[1]
        self.holed = threading.Event()
        self.socks, self.dummies = [], []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self):
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            self.socks.append(c)
            if self.holed.is_set():
                return  # holds this one, accepts no more
            try:
                u = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                c.close()
                continue
            self.socks.append(u)
            for x, y in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(x, y), daemon=True).start()

    def _pump(self, a, b):
        while True:
            try:
                data = a.recv(65536)
            except OSError:
                break
            if not data or self.holed.is_set():
                break
            try:
                b.sendall(data)
            except OSError:
                break

    def blackhole(self):
        self.holed.set()
        for _ in range(2):
            d = socket.socket()
            d.setblocking(False)
            d.connect_ex(("127.0.0.1", self.port))
            self.dummies.append(d)
        self.acceptor.join(5)
        for s in list(self.socks):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def connecting(self) -> int:
        """Connections to the proxy stuck in SYN_SENT, other than our own dummies."""
        mine = {d.getsockname()[1] for d in self.dummies}
        n = 0
        with open("/proc/net/tcp") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, remote, state = fields[1], fields[2], fields[3]
                if state == "02" and int(remote.split(":")[1], 16) == self.port \
                        and int(local.split(":")[1], 16) not in mine:
                    n += 1
        return n

    def close(self):
        for s in [self.lsock, *self.socks, *self.dummies]:
            try:
                s.close()
            except OSError:
                pass


@pytest.mark.timeout(40)
def test_stop_while_redis_unreachable_delivers_the_exception_at_once(r, spawn, enqueue, redis_server):
    """Origin: core review (9a4b9fe), #5."""
    proxy = BlackholeProxy(redis_server.port)
    try:
        w = spawn(JOB_MODULES=TERM_MODULES, REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0",
                  EVENTS_REDIS_URL=redis_server.url, HEARTBEAT_INTERVAL=1, SHUTDOWN_WINDOW=8, TERM_TIMEOUT=4)
        w.wait_for(r"event=worker\.start")
        enqueue("tt_term_probe", "ev")
        assert next_event(r, "ev")["event"] == "started"
        wait_until(lambda: dyno.sleeping(w.pid), 5, "the job in its sleep")
        proxy.blackhole()
        # the worker's next Redis call finds its connection closed and reconnects: a connect that hangs
        wait_until(lambda: proxy.connecting() > 0, 8, "the worker stuck connecting")
        time.sleep(0.2)
        t_sig = time.time()
        w.signal(signal.SIGTERM)  # the worker only (foreman)
        term = next_event(r, "ev", timeout=10)
        assert term["event"] == "term" and term["t"] - t_sig < 0.2, (term["t"] - t_sig, w.output)
    finally:
        proxy.close()



# --- failover: READONLY drops the connection ---

def _server_on_socket(tmp_path, name, port=0):
    """A redis-server listening on a Unix socket (and on TCP ``port`` unless 0)."""
    sock = str(tmp_path / f"{name}.sock")
    proc = subprocess.Popen(
        [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--unixsocket", sock,
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path), "--loglevel", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c = redis.Redis(unix_socket_path=sock, decode_responses=True)
    deadline = time.monotonic() + 10
    while True:
        try:
            c.ping()
            return proc, sock, c
        except redis.ConnectionError:
            assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
            time.sleep(0.02)


@pytest.mark.timeout(60)
def test_readonly_after_failover_reconnects(tmp_path):
    """DNS-style failover: the name the worker connects to now leads to the new primary, and the node it is still
    connected to became a replica. ReadOnlyError must drop the connection so the next attempt reconnects (before,
    every later call failed with READONLY on the same connection).

    Origin: issue 10, adversarial review #6."""
    a_proc, a_sock, a = _server_on_socket(tmp_path, "a")
    b_port = free_port()
    b_proc, b_sock, b = _server_on_socket(tmp_path, "b", port=b_port)
    try:
        link = tmp_path / "redis.sock"  # the "DNS name": a symlink we can point at either server
        os.symlink(a_sock, link)
        cfg = worker.config.from_mapping({"REDIS_URL": f"unix://{link}", "REDIS_TIMEOUT": "2"})
        broker = Broker(client.connect(cfg), cfg)
        broker.heartbeat("w:1")  # connected to A, the primary
        assert a.zrange(WORKERS, 0, -1) == ["w:1"]
        # failover: A becomes a replica of B, and the name now leads to B
        a.replicaof("127.0.0.1", b_port)
        with pytest.raises(redis.ReadOnlyError):
            a.set("probe", "1")
        tmp = tmp_path / "redis.sock.new"
        os.symlink(b_sock, tmp)
        os.replace(tmp, link)
        broker.heartbeat("w:1")
        broker.push("push", ["x", 1], {})
        assert b.zrange(WORKERS, 0, -1) == ["w:1"]
        assert b.llen("worker:queue:default") == 1
    finally:
        for p in (a_proc, b_proc):
            p.kill()
            p.wait(10)


def test_readonly_error_drops_the_connection_even_without_retries(tmp_path):
    """Origin: issue 10, adversarial review #6."""
    a_proc, a_sock, a = _server_on_socket(tmp_path, "a")
    b_port = free_port()
    b_proc = start_redis_server(b_port, tmp_path)
    try:
        cfg = worker.config.from_mapping({"REDIS_URL": f"unix://{a_sock}"})
        rc = client.connect(cfg, retries=0)
        rc.set("k", "1")
        first = rc.client_id()
        a.replicaof("127.0.0.1", b_port)
        with pytest.raises(redis.ReadOnlyError):
            rc.set("k", "2")
        assert rc.client_id() != first, "the connection that got READONLY must be dropped"
    finally:
        for p in (a_proc, b_proc):
            p.kill()
            p.wait(10)



# --- Redis loses its data (a restart without persistence) while a job runs ---

@pytest.mark.timeout(60)
@pytest.mark.parametrize("seen_at", ["beat", "stop"])
def test_a_job_held_through_redis_data_loss_is_claimed_again_and_put_back_on_stop(r, spawn, enqueue, seen_at):
    """Redis restarted empty under a running job: its claim, the worker's registration and the status record are
    gone, and only the worker knows the job. At its next beat (or the stop's call, if that comes first) the worker
    sees P:epoch gone, registers again and claims the job again, so the stop puts it back (before: the put-back
    found no claim and dropped the job) and a dyno killed outright would leave it recoverable.

    Origin: issue 10, core-defect hardening."""
    interval, ttl = ("0.5", "2") if seen_at == "beat" else ("10", "30")
    w = spawn(JOB_MODULES=TERM_MODULES, HEARTBEAT_INTERVAL=interval, HEARTBEAT_TTL=ttl, SHUTDOWN_WINDOW="4")
    name = name_of(w)
    running = enqueue("tt_reraise", "ev")
    wait_until(lambda: count(r, "ev", "started") == 1, 15, "the running job")
    r.flushall()  # what a Key-Value Store restarted without persistence looks like
    if seen_at == "beat":
        w.wait_for(r"event=redis\.data_lost .*held=1")
        wait_until(lambda: [json.loads(p)["id"] for p in r.lrange(f"worker:processing:{name}", 0, -1)] == [running],
                   10, "the claim restored")
        assert r.zscore(WORKERS, name) is not None and r.hget(f"worker:worker:{name}", "job:0")
    rep = dyno.shutdown(w.pid, window=4)
    assert not rep.sigkilled, rep
    assert w.wait(5) == 0, w.output
    assert [json.loads(p)["id"] for p in r.lrange(QUEUE, 0, -1)] == [running], w.output
    assert processing(r) == {} and r.zscore(WORKERS, name) is None, w.output
    assert "event=redis.data_lost" in w.output
    assert r.smembers("worker:queues") == {"default"}, "a QUEUES=* worker must find the job put back"


@pytest.mark.timeout(60)
def test_an_outcome_between_beats_after_data_loss_is_recorded(r, spawn, enqueue):
    """The data loss is first seen by a call that records an outcome, not by a beat (the interval is long): the
    call must not drop it as "not ours" (its claim is gone with the data); the worker restores and records it.

    Origin: issue 10, core-defect hardening."""
    w = spawn(JOB_MODULES=TERM_MODULES, HEARTBEAT_INTERVAL="10", HEARTBEAT_TTL="30")
    name_of(w)
    job_id = enqueue("cc_span", "ev", "short", seconds=1.5)
    wait_event(r, "ev", "start", "short")
    r.flushall()  # a restart without persistence, while the job runs
    w.wait_for(rf"event=job\.done .*job={job_id}")
    w.wait_for(r"event=redis\.data_lost .*held=1")
    wait_until(lambda: r.get("worker:stat:processed") == "1", 10, "the outcome recorded after the restore")
    assert r.hget(f"worker:job:{job_id}", "status") == "done"
    assert processing(r) == {}
