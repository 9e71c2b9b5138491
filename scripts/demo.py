"""The SIGTERM contract in one command (`make demo`): a dyno restart during a running job, then a timeline.

Starts a redis-server of its own (free port, temp dir, removed afterwards) and a worker (`python -m worker`),
enqueues ``sample_work(seconds=10, cleanup=2)`` and, 3 s after the job started, sends SIGTERM to every process of
the worker as Heroku's dyno manager does. The environment passes through: ``TERM_TIMEOUT=1 make demo`` cuts the
cleanup short, so the job is put back at the head of its queue instead of finishing.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import redis  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(fn, timeout, what):
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            sys.exit(f"demo: timed out waiting for {what}")
        time.sleep(0.01)


def main():
    if not shutil.which("redis-server"):
        sys.exit("demo: redis-server is not installed (apt-get install redis-server, or brew install redis)")
    for name in ("DYNO", "KEY_PREFIX", "QUEUES", "JOB_MODULES"):  # the demo's own layout (DYNO: keep timestamps)
        os.environ.pop(name, None)
    tmp, port = tempfile.mkdtemp(prefix="worker-demo-"), free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
    worker = None
    try:
        r = redis.Redis.from_url(url, decode_responses=True)
        wait_until(lambda: _ping(r), 10, "redis-server")
        env = dict(os.environ, REDIS_URL=url, LOG_LEVEL="DEBUG", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
        lines = []  # (monotonic arrival time, text)
        worker = subprocess.Popen([sys.executable, "-m", "worker"], env=env, cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=lambda: [lines.append((time.monotonic(), ln.rstrip("\n")))
                                         for ln in worker.stdout], daemon=True).start()

        def seen(pattern):
            return next((t for t, ln in list(lines) if re.search(pattern, ln)), None)

        wait_until(lambda: seen(r"event=worker\.start"), 15, "the worker to start")
        os.environ["REDIS_URL"] = url  # the enqueue API reads its connection from the environment
        from worker.sample import sample_work
        job_id = sample_work.enqueue(seconds=10, cleanup=2)
        wait_until(lambda: seen(r"event=job\.start"), 15, "the job to start")
        t0 = seen(r"event=job\.start")
        print(f"job {job_id} (sample_work seconds=10 cleanup=2) started; SIGTERM in 3 s ...", flush=True)
        time.sleep(max(0.0, t0 + 3 - time.monotonic()))
        t_term = time.monotonic()
        os.killpg(worker.pid, signal.SIGTERM)  # every process of the "dyno": the worker and its job's child
        code = worker.wait(30)
        t_exit = time.monotonic()
        time.sleep(0.05)  # let the reader thread take the last lines
        print_timeline(r, job_id, lines, t0, t_term, t_exit, code, seen)
    finally:
        if worker and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        server.kill()
        server.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def print_timeline(r, job_id, lines, t0, t_term, t_exit, code, seen):
    def ms(t):
        return f"+{(t - t_term) * 1000:.1f} ms"
    window = os.environ.get("SHUTDOWN_WINDOW", "10")
    timeout = os.environ.get("TERM_TIMEOUT", "default: window - 1.5")
    print(f"\nTimeline (SHUTDOWN_WINDOW={window} s, TERM_TIMEOUT={timeout}):")
    print(f"  t={t_term - t0:.3f} s after the job started: SIGTERM to every process of the worker")
    caught = seen(r"caught TermException")
    print(f"  {ms(caught)}: TermException raised in the job" if caught else "  TermException: not seen (!)")
    graceful = seen(r"graceful shutdown!")
    killed = seen(r"event=shutdown\.child_killed")
    if graceful:
        print(f"  {ms(graceful)}: graceful shutdown! (cleanup finished)")
    if killed:
        print(f"  {ms(killed)}: cleanup cut short at TERM_TIMEOUT: the job's process was killed")
    print(f"  {ms(t_exit)}: worker exited with code {code} "
          f"({t_exit - t_term:.3f} s after SIGTERM; the platform would SIGKILL at {window} s)")
    queue = [json.loads(p)["id"] for p in r.lrange("worker:queue:default", 0, -1)]
    if job_id in queue:
        where = f"back in queue 'default' at position {queue.index(job_id)} (the head: it runs first next time)"
    elif r.zscore("worker:failed", job_id) is not None:
        where = "failed"
    elif r.get("worker:stat:processed") == "1":
        where = "done"
    else:
        where = "LOST (this is a bug)"
    print(f"  the job: {where}")
    print("\nWorker output (time relative to SIGTERM):")
    for t, ln in lines:
        print(f"  {(t - t_term) * 1000:+8.0f} ms | {ln}")


def _ping(r):
    try:
        return r.ping()
    except redis.ConnectionError:
        return False


if __name__ == "__main__":
    main()
