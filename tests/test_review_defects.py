"""Regression tests for the defects an adversarial review found (numbers are the review's).

Real redis-server and real workers throughout; synchronisation on job events (Redis lists) and log lines. Stalls are
real: a SIGSTOPped fork server, a TCP proxy that stops forwarding.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time

import pytest

import tests.jobs  # noqa: F401  (registers push etc. for Broker.push)
import tests.jobs_review  # noqa: F401
import tests.jobs_term  # noqa: F401
from tests.dyno import sleeping
from tests.support import children, forkserver_of, wait_until
from worker.config import from_mapping
from worker.fetch import Broker

MODULES = "worker.sample,tests.jobs,tests.jobs_review"


@pytest.fixture
def enqueue(r, redis_server):
    broker = Broker(r, from_mapping({"REDIS_URL": redis_server.url}))
    return lambda name, *args, **kwargs: broker.push(name, args, kwargs)


def event_of(r, key, timeout=15.0) -> dict:
    return json.loads(pop(r, key, timeout))


def pop(r, key, timeout=15.0):
    """BLPOP in 1 s steps (the test client's socket timeout is shorter than some waits here)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        item = r.blpop(key, 1)
        if item:
            return item[1]
    raise AssertionError(f"nothing on {key} within {timeout}s")


def name_of(w) -> str:
    return re.search(r"worker=(\S+)", w.wait_for(r"event=worker\.start")).group(1)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def processing(r) -> dict:
    return {k: r.lrange(k, 0, -1) for k in r.keys("worker:processing:*") if r.llen(k)}


def status_of(r, job_id):
    return r.hget(f"worker:job:{job_id}", "status")


def still_works(r, w, enqueue, tag):
    """The worker is alive and runs a new job."""
    assert w.popen.poll() is None, f"the worker exited:\n{w.output}"
    enqueue("push", f"alive:{tag}", "yes")
    try:
        got = pop(r, f"alive:{tag}", 15)
    except AssertionError:
        got = None
    assert got == "yes", f"the worker did not run a later job:\n{w.output}"
    assert w.popen.poll() is None, f"the worker exited:\n{w.output}"


def release(pid):
    """Teardown of a SIGSTOPped process: let it go, then kill it (it may already be gone)."""
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def heartbeat(r, name):
    seen = r.hget(f"worker:worker:{name}", "seen")
    return int(float(seen)) if seen else None


def redis_ms(r) -> int:
    sec, usec = r.time()
    return sec * 1000 + usec // 1000


# --- #1 a 400-digit enqueued_at crashes latency (metrics sampler, status) ---

HUGE = '{"id":"x","name":"noop","queue":"other","args":[],"kwargs":{},"enqueued_at":1' + "0" * 400 + "}"


@pytest.mark.timeout(40)
def test_huge_enqueued_at_crashes_neither_the_metrics_sampler_nor_status(r, spawn, cli, enqueue):
    r.rpush("worker:queue:other", HUGE)
    r.sadd("worker:queues", "other")
    w = spawn(JOB_MODULES=MODULES, QUEUES="default", METRICS_INTERVAL=1)
    w.wait_for(r"event=worker\.start")
    w.wait_for(r"event=metrics ", timeout=10)  # a sample taken with the bad head in view (the sampler ran)
    still_works(r, w, enqueue, "huge")
    res = cli("status")
    assert res.returncode == 0, res.stdout + res.stderr
    row = next((line for line in res.stdout.splitlines() if line.split()[:1] == ["other"]), None)
    assert row is not None and row.split()[1:3] == ["1", "?"], res.stdout  # depth 1, latency unknown
    res = cli("status", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    (q,) = [q for q in json.loads(res.stdout)["queues"] if q["name"] == "other"]
    assert q["depth"] == 1 and q["latency"] is None, q
    assert w.popen.poll() is None, w.output


# --- #2 a report or checkpoint the worker cannot decode ---

@pytest.mark.timeout(30)
def test_deeply_nested_return_value_does_not_kill_the_worker(r, spawn, enqueue):
    w = spawn(JOB_MODULES=MODULES)
    job_id = enqueue("rv_deep_return", "ev")
    assert event_of(r, "ev")["event"] == "started"
    wait_until(lambda: status_of(r, job_id) in ("done", "failed"), 15, "the deep return recorded")
    wait_until(lambda: processing(r) == {}, 10, "the processing list emptied")
    still_works(r, w, enqueue, "deep-return")


@pytest.mark.timeout(30)
def test_deeply_nested_checkpoint_does_not_kill_the_worker(r, spawn, enqueue):
    w = spawn(JOB_MODULES=MODULES, HEARTBEAT_INTERVAL=1)
    name = name_of(w)
    job_id = enqueue("rv_deep_checkpoint", "ev")
    assert event_of(r, "ev")["event"] == "checkpointed"
    # two heartbeats after the checkpoint: the worker has looked at it (progress() saves checkpoints at beats)
    t0 = redis_ms(r)
    wait_until(lambda: (heartbeat(r, name) or 0) >= t0 + 1500 or w.popen.poll() is not None, 10,
               "two heartbeats after the checkpoint")
    assert w.popen.poll() is None, f"the worker died on the checkpoint:\n{w.output}"
    r.rpush("ev:go", "1")
    assert event_of(r, "ev")["event"] == "finished"
    wait_until(lambda: status_of(r, job_id) in ("done", "failed"), 15, "the job recorded")
    wait_until(lambda: processing(r) == {}, 10, "the processing list emptied")
    still_works(r, w, enqueue, "deep-ckpt")


@pytest.mark.timeout(30)
def test_forged_report_frame_does_not_kill_the_worker(r, spawn, enqueue):
    w = spawn(JOB_MODULES=MODULES)
    job_id = enqueue("rv_forged_report", "ev")
    assert event_of(r, "ev")["event"] == "started"
    wait_until(lambda: status_of(r, job_id) in ("done", "failed") or w.popen.poll() is not None, 15,
               "the forged report recorded")
    assert w.popen.poll() is None, f"the worker died on the forged report:\n{w.output}"
    wait_until(lambda: processing(r) == {}, 10, "the processing list emptied")
    still_works(r, w, enqueue, "forged")
    assert r.hget("worker:failed:data", job_id) is not None, "recorded as failed, with a record"


# --- #3 fork server stopped while a job finishes ---

@pytest.mark.timeout(45)
def test_fork_server_stopped_while_a_job_finishes_is_replaced_and_the_job_is_done(r, spawn, enqueue):
    w = spawn(JOB_MODULES=MODULES)
    w.wait_for(r"event=worker\.start")
    job_id = enqueue("rv_sleep", "ev", 1.0)
    assert event_of(r, "ev")["event"] == "started"
    [server] = forkserver_of(w.pid)
    time.sleep(0.3)  # the job is in its sleep: stop the server before it can reap the job
    os.kill(server, signal.SIGSTOP)
    try:
        assert event_of(r, "ev")["event"] == "ended"  # the job reported ok and exited under a stopped server
        # recorded from its report: the exit status the stopped server cannot send is not waited for
        w.wait_for(rf"event=job\.done .*job={job_id}", timeout=10)
        assert "event=forkserver.restart" not in w.output, w.output
        # the log line comes first; the outcome (and the status record) with the worker's next Redis call
        wait_until(lambda: status_of(r, job_id) == "done", 5, "the job's status record to say done")
        # the next job cannot be handed over: the stopped server is replaced (SPAWN_TIMEOUT) and the job runs
        enqueue("push", "alive:after-stall", "yes")
        w.wait_for(r"event=forkserver\.restart", timeout=20)
        assert pop(r, "alive:after-stall", 20) == "yes", w.output
        assert w.popen.poll() is None, w.output
    finally:
        release(server)
    assert f"event=job.failed job={job_id}" not in w.output and "job.crash" not in w.output


# --- a fork server stopped or dead during a shutdown (chaos review of issue 9) ---

@pytest.mark.timeout(45)
def test_fork_server_stopped_at_a_sigterm_still_puts_the_stubborn_job_back_in_the_window(r, spawn, enqueue):
    """The worker kills a stubborn job at its deadline itself; a fork server that cannot report the exit (stopped)
    must not keep the job from being put back, nor the worker from leaving before its window (the watchdog's hard
    exit would leave the job in the processing list until recovery)."""
    w = spawn(JOB_MODULES=MODULES, SHUTDOWN_WINDOW=4)  # TERM_TIMEOUT 2.5 s, hard exit at 3.5 s
    job_id = enqueue("stubborn", "ev")
    assert event_of(r, "ev")["event"] == "started"
    wait_until(lambda: sleeping(w.pid), 5, "the job in its sleep")  # inside its try: it swallows what comes
    [server] = forkserver_of(w.pid)
    os.kill(server, signal.SIGSTOP)
    try:
        w.signal(signal.SIGTERM)
        assert w.wait(10) == 0, w.output
    finally:
        release(server)
    assert "event=shutdown.child_killed" in w.output and "shutdown.watchdog" not in w.output, w.output
    assert [json.loads(x)["id"] for x in r.lrange("worker:queue:default", 0, -1)] == [job_id]
    assert processing(r) == {} and r.zcard("worker:failed") == 0


@pytest.mark.timeout(45)
def test_fork_server_dying_during_a_stop_puts_the_cleaning_job_back(r, spawn, enqueue):
    """A job still in its TERM_TIMEOUT cleanup when the fork server dies (its child dies with it) was interrupted by
    the stop, not broken: it goes back to its queue, unfailed, as if it had been killed at the deadline."""
    w = spawn(JOB_MODULES=MODULES + ",tests.jobs_term", SHUTDOWN_WINDOW=6)
    job_id = enqueue("tt_reraise", "ev", 60, cleanup=30)
    assert event_of(r, "ev")["event"] == "started"
    wait_until(lambda: sleeping(w.pid), 5, "the job in its sleep")
    w.signal(signal.SIGTERM)
    assert event_of(r, "ev")["event"] == "term"
    [server] = forkserver_of(w.pid)
    os.kill(server, signal.SIGKILL)
    assert w.wait(10) == 0, w.output
    assert "event=shutdown.job_put_back" in w.output, w.output
    assert [json.loads(x)["id"] for x in r.lrange("worker:queue:default", 0, -1)] == [job_id]
    assert processing(r) == {} and r.zcard("worker:failed") == 0
    assert json.loads(r.lindex("worker:queue:default", 0)).get("attempts", 0) == 0, "counted as a failed attempt"


# --- #4 a large payload handed to a stopped fork server freezes the loop ---

@pytest.mark.timeout(50)
def test_large_job_for_a_stopped_fork_server_does_not_freeze_the_loop(r, spawn, enqueue):
    w = spawn(JOB_MODULES=MODULES, HEARTBEAT_INTERVAL=1)
    name = name_of(w)
    warm = enqueue("push", "warm", "1")  # the server is up and has run a job, and the slot is free again
    w.wait_for(rf"event=job\.done .*job={warm}")
    [server] = forkserver_of(w.pid)
    os.kill(server, signal.SIGSTOP)
    try:
        enqueue("rv_blob", "ev", "x" * 400_000)
        wait_until(lambda: processing(r), 10, "the claim")
        t0 = redis_ms(r)
        # the loop keeps beating for 3 s and more while the handover is stuck
        wait_until(lambda: (heartbeat(r, name) or 0) >= t0 + 3000, 6, "heartbeats 3 s past the handover")
        w.wait_for(r"event=forkserver\.restart", timeout=15)
        ev = event_of(r, "ev", timeout=20)
        assert ev == {**ev, "event": "ran", "n": 400_000}
        assert server not in forkserver_of(w.pid), "ran under a new fork server"
    finally:
        release(server)
    assert w.popen.poll() is None, w.output


# --- #5 foreman-style SIGTERM while Redis is unreachable and a job runs ---

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
    proxy = BlackholeProxy(redis_server.port)
    try:
        w = spawn(JOB_MODULES=MODULES, REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0",
                  REVIEW_REDIS_URL=redis_server.url, HEARTBEAT_INTERVAL=1, SHUTDOWN_WINDOW=8, TERM_TIMEOUT=4)
        w.wait_for(r"event=worker\.start")
        enqueue("rv_term_probe", "ev")
        assert event_of(r, "ev")["event"] == "started"
        wait_until(lambda: sleeping(w.pid), 5, "the job in its sleep")
        proxy.blackhole()
        # the worker's next Redis call finds its connection closed and reconnects: a connect that hangs
        wait_until(lambda: proxy.connecting() > 0, 8, "the worker stuck connecting")
        time.sleep(0.2)
        t_sig = time.time()
        w.signal(signal.SIGTERM)  # the worker only (foreman)
        term = event_of(r, "ev", timeout=10)
        assert term["event"] == "term" and term["t"] - t_sig < 0.2, (term["t"] - t_sig, w.output)
    finally:
        proxy.close()


# --- #6 checkpoint() from several threads at once ---

@pytest.mark.timeout(30)
def test_checkpoints_from_three_threads_keep_the_report_intact(r, spawn, enqueue):
    w = spawn(JOB_MODULES=MODULES)
    job_id = enqueue("rv_threaded_checkpoints", "ev")
    ev = event_of(r, "ev")
    assert ev["event"] == "finished" and ev["errors"] == [], ev
    line = w.wait_for(rf"event=job\.(done|failed|retry|bad) .*job={job_id}", 15)
    assert "event=job.done" in line, w.output
    wait_until(lambda: status_of(r, job_id) == "done", 10, "the job recorded done")
    assert processing(r) == {}


# --- #7 a subprocess the job leaves behind when it returns ---

@pytest.mark.timeout(30)
def test_subprocess_left_by_a_job_that_returns_is_gone_once_the_job_is_done(r, spawn, enqueue):
    w = spawn(JOB_MODULES=MODULES)
    job_id = enqueue("rv_popen_return", "pid")
    pid = int(pop(r, "pid", 15))
    try:
        w.wait_for(rf"event=job\.done .*job={job_id}", timeout=15)
        wait_until(lambda: not alive(pid), 3, f"the job's sleep (pid {pid}) to be gone")
    finally:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"sleep" in f.read():
                    os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# --- #8 a payload far over MAX_PAYLOAD_BYTES ---

@pytest.mark.timeout(30)
def test_oversized_bad_payload_is_failed_with_a_bounded_copy(r, spawn, enqueue):
    r.rpush("worker:queue:default", "j" * 200_000)
    r.sadd("worker:queues", "default")
    w = spawn(JOB_MODULES=MODULES, MAX_PAYLOAD_BYTES=1024)
    wait_until(lambda: r.hlen("worker:failed:data") == 1, 15, "the failure record")
    (rec,) = [json.loads(v) for v in r.hvals("worker:failed:data")]
    reason = " ".join(str(rec.get(k) or "") for k in ("cause", "type", "message"))
    assert "MAX_PAYLOAD_BYTES" in reason or "over" in reason, rec.keys()
    assert isinstance(rec.get("payload"), str) and len(rec["payload"]) <= 70_000, len(rec.get("payload") or "")
    assert r.llen("worker:queue:default") == 0
    wait_until(lambda: processing(r) == {}, 10, "the processing list emptied")
    still_works(r, w, enqueue, "oversized")


# --- #9 a stop while a job is being handed over ---

@pytest.mark.timeout(30)
def test_parent_only_stop_reaches_a_running_job_at_once(r, spawn, enqueue):
    w = spawn(JOB_MODULES=MODULES, SHUTDOWN_WINDOW=4, TERM_TIMEOUT=2)
    w.wait_for(r"event=worker\.start")
    enqueue("rv_term_probe", "ev")
    assert event_of(r, "ev")["event"] == "started"
    wait_until(lambda: sleeping(w.pid), 5, "the job in its sleep")
    t_sig = time.time()
    w.signal(signal.SIGTERM)  # the worker only (foreman)
    try:
        term = event_of(r, "ev", timeout=10)
    except AssertionError:
        raise AssertionError(f"no term event; worker output:\n{w.output}") from None
    assert term["event"] == "term" and term["t"] - t_sig < 0.3, (term, t_sig)
    assert w.wait(10) == 0




@pytest.mark.timeout(30)
def test_parent_only_stop_before_the_pid_is_known_reaches_the_job_at_once(r, spawn, enqueue):
    """Deterministic 'pid not yet known': the fork server's spare child is stopped, so handing it a 400 KB job
    blocks the server before it can send the pid; the worker gets its SIGTERM meanwhile; 0.3 s later the spare goes
    on and the pid reaches the worker. The exception must follow at once, not at the loop's next wake-up (up to
    1 s later) or the TERM_TIMEOUT deadline. (Stopping the fork server itself would not do: its SIGCONT sends the
    worker a SIGCHLD, which wakes the loop by chance.)"""
    w = spawn(JOB_MODULES=MODULES, SHUTDOWN_WINDOW=4, TERM_TIMEOUT=2)
    w.wait_for(r"event=worker\.start")
    warm = enqueue("push", "warm", "1")
    w.wait_for(rf"event=job\.done .*job={warm}")  # the warm-up child is reaped: the server's one child is the spare
    [server] = forkserver_of(w.pid)
    wait_until(lambda: len(children(server)) == 1, 5, "the fork server's spare")
    [spare] = children(server)
    os.kill(spare, signal.SIGSTOP)
    try:
        job_id = enqueue("rv_term_probe", "ev", blob="b" * 400_000)
        w.wait_for(rf"event=job\.start .*job={job_id}", timeout=10)
        t_sig = time.monotonic()
        w.signal(signal.SIGTERM)
        w.wait_for(r"event=shutdown\.signal", timeout=5)
        time.sleep(0.3)
        assert "event=shutdown.exception_delivered" not in w.output, "the pid was known before the stop"
    finally:
        t_cont = time.monotonic()
        os.kill(spare, signal.SIGCONT)
    line = w.wait_for(r"event=shutdown\.exception_delivered", timeout=10)
    elapsed = float(re.search(r"elapsed=([\d.]+)", line).group(1))
    # promptly once the server reports the pid (before the fix: at the loop's next 1 s wake-up, or the deadline)
    assert elapsed < (t_cont - t_sig) + 0.3, (line, round(t_cont - t_sig, 3))
    assert w.wait(10) == 0
    assert "shutdown.child_killed" not in w.output, w.output
    # put back before the job function ran, or it caught the exception and returned: done
    assert r.llen("worker:queue:default") == 1 or status_of(r, job_id) == "done", w.output


# --- the end of a run (review of "a job ends with its report") ---

def kill_quietly(*pids):
    for pid in pids:
        if pid:
            release(pid)


@pytest.mark.timeout(45)
@pytest.mark.parametrize("how", ["exit", "return"])
def test_a_process_the_job_forked_cannot_end_the_job_with_a_report_of_its_own(r, spawn, enqueue, how):
    """A helper the job forks shares the report pipe; leaving through the runtime, it must not report: the job is
    recorded from its own process's report, once, after its whole run (no retry, no second run at once)."""
    job_id = enqueue("rv_forks_a_helper", "ev", 1.0, how)
    w = spawn(JOB_MODULES=MODULES, JOB_RETRIES=3)
    line = w.wait_for(rf"event=job\.(done|retry|failed) .*job={job_id}", timeout=20)
    assert "event=job.done" in line and float(re.search(r"duration=([\d.]+)", line).group(1)) >= 1.0, w.output
    # the log line comes first; the status record with the worker's next Redis call
    wait_until(lambda: r.hget(f"worker:job:{job_id}", "result") == '"parent"', 5, "the job's own result recorded")
    assert [json.loads(x)["event"] for x in r.lrange("ev", 0, -1)] == ["start", "end"]


@pytest.mark.timeout(45)
def test_a_finished_jobs_leftover_dies_even_if_its_fork_server_stalls_before_the_stop(r, spawn, enqueue):
    """The job is recorded from its report; its fork server, stalled, never reaps it. The worker still ends the
    job's process group before it leaves (it kills the lingering server), and exits 0 in its window."""
    enqueue("rv_leaves_sleep_and_stalls_server", "ev")
    w = spawn(JOB_MODULES=MODULES, SHUTDOWN_WINDOW=4)
    ev = event_of(r, "ev")
    sleeper, server = ev["child"], ev["server"]
    try:
        w.wait_for(r"event=job\.done")
        w.signal(signal.SIGTERM)
        assert w.wait(10) == 0, w.output
        wait_until(lambda: not alive(sleeper), 2, "the job's `sleep 300` gone")
    finally:
        kill_quietly(sleeper, server)
    assert "shutdown.watchdog" not in w.output, w.output


@pytest.mark.timeout(45)
def test_an_interrupted_run_under_a_stalled_fork_server_is_killed_at_the_deadline_and_put_back(r, spawn, enqueue):
    """Its report (interrupted) waits for an exit status the stalled server never sends: the deadline's kill, on
    time, ends the wait, and the worker exits 0 inside its window with the job back in its queue."""
    job_id = enqueue("rv_interrupted_stalls_server", "ev", 0.45)
    w = spawn(JOB_MODULES=MODULES, SHUTDOWN_WINDOW=4)  # TERM_TIMEOUT 2.5 s, hard exit at 3.5 s
    server = event_of(r, "ev")["server"]
    wait_until(lambda: sleeping(w.pid), 5, "the job in its sleep")
    try:
        w.signal(signal.SIGTERM)
        assert event_of(r, "ev")["event"] == "reraise"
        assert w.wait(10) == 0, w.output
    finally:
        kill_quietly(server)
    killed = float(re.search(r"event=shutdown\.child_killed .*elapsed=([\d.]+)", w.output).group(1))
    assert 2.5 <= killed < 2.5 + 0.3, w.output
    assert "shutdown.watchdog" not in w.output
    assert [json.loads(x)["id"] for x in r.lrange("worker:queue:default", 0, -1)] == [job_id]
    assert processing(r) == {}


@pytest.mark.timeout(45)
def test_an_interrupted_runs_leftover_dies_before_it_is_put_back_when_the_fork_server_dies(r, spawn, enqueue):
    """An interrupted run (report I) that left `sleep 300` behind waits for its exit status; its fork server, stalled,
    then dies instead: the worker ends the run's process group itself before the job goes back to its queue."""
    job_id = enqueue("rv_interrupted_stalls_server", "ev", 0.0, True)
    w = spawn(JOB_MODULES=MODULES, SHUTDOWN_WINDOW=6)
    server = event_of(r, "ev")["server"]
    wait_until(lambda: sleeping(w.pid), 5, "the job in its sleep")
    w.signal(signal.SIGTERM)
    sleeper = event_of(r, "ev")["child"]
    try:
        wait_until(lambda: not alive(server) or open(f"/proc/{server}/stat").read().split(") ")[1][0] == "T", 5,
                   "the fork server stopped")
        os.kill(server, signal.SIGKILL)
        assert w.wait(10) == 0, w.output
        assert not alive(sleeper), "the interrupted run's `sleep 300` outlived it"
    finally:
        kill_quietly(sleeper)
    assert [json.loads(x)["id"] for x in r.lrange("worker:queue:default", 0, -1)] == [job_id]
    assert "shutdown.watchdog" not in w.output and "event=shutdown.job_put_back" in w.output, w.output


@pytest.mark.timeout(45)
def test_a_job_that_did_its_work_is_done_even_if_flushing_its_output_blocks(r, spawn, enqueue):
    """The report comes before the flush: the job is done, not timed out and retried; and the stuck child does not
    live on for ever (FLUSH_LIMIT, then SIGALRM; the fork server then ends its process group)."""
    from worker.child import FLUSH_LIMIT
    job_id = enqueue("rv_hanging_flush", "ev")
    w = spawn(JOB_MODULES=MODULES, JOB_TIMEOUT=2, JOB_RETRIES=1)
    ev = event_of(r, "ev")
    assert ev["event"] == "work-done"
    line = w.wait_for(rf"event=job\.(done|retry|failed) .*job={job_id}", timeout=10)
    assert "event=job.done" in line, w.output
    wait_until(lambda: not alive(ev["pid"]), FLUSH_LIMIT + 3, "the child stuck in its flush ended")
