"""Extra jobs for the "nothing lost" suite (test_recovery, test_retries, test_outage, test_fuzz, test_chaos).

Spawned workers load them with ``JOB_MODULES=worker.sample,tests.jobs,tests.jobs_chaos``. Names start with ``nl_``
(job names are global). Most report to Redis lists through ``tests.jobs.event``; the outage jobs write to a file
instead, because a job that needs Redis would itself fail while Redis is down, and the outage tests are about the
runtime's bookkeeping, not the job's.
"""
import fcntl
import os
import socket
import time
from urllib.parse import urlsplit

from tests.jobs import event, r
from worker import job


@job
def nl_stamp(key, tag):
    """Records when it ran (for enqueue_in / enqueue_at lower bounds)."""
    event(key, "ran", tag=tag)


@job
def nl_hang(key, seconds=60.0):
    """Announces its start, then runs for ``seconds`` (long enough to be killed mid-job)."""
    event(key, "started")
    time.sleep(seconds)
    event(key, "done")


@job
def nl_hang_first(key, seconds=60.0):
    """Runs for ``seconds`` the first time only (counted in Redis), then finishes at once: a job whose first
    worker gets killed mid-job and whose recovered run completes."""
    n = r().incr(key + ":runs")
    event(key, "started", run=n)
    if n == 1:
        time.sleep(seconds)
    event(key, "done", run=n)


@job(retries=2)
def nl_always_fails(key):
    event(key, "attempt")
    raise RuntimeError("nl_always_fails: always")


@job(retries=2)
def nl_fail_then_hang(key):
    """Fails on its first run (so it carries attempts=1 and a history), then hangs until interrupted."""
    n = r().incr(key + ":runs")
    event(key, "started", run=n)
    if n == 1:
        raise RuntimeError("first run fails")
    time.sleep(60)


@job
def nl_boom(message, delay=0.01):
    """Fails (no retries). The short delay keeps failure timestamps (ms) distinct, so FAILED_MAX trims by age."""
    time.sleep(delay)
    raise ValueError(message)


@job
def nl_fail_unless(flag_key, out_key):
    """Fails until ``flag_key`` exists: a job fixed "later", then retried from the failed registry."""
    if not r().exists(flag_key):
        raise RuntimeError(f"{flag_key} is not set")
    r().rpush(out_key, "ok")


@job
def nl_note(path, tag, seconds=0.0, first_run_seconds=None):
    """Appends ``start <tag> <pid>`` to ``path``, runs ``seconds`` (or ``first_run_seconds`` on the tag's first
    run), then appends ``done <tag> <pid>``. Touches no Redis, so it behaves the same during a Redis outage."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        first = not any(line.split()[:2] == ["start", tag] for line in f)
        f.write(f"start {tag} {os.getpid()}\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)
    time.sleep(first_run_seconds if first and first_run_seconds is not None else seconds)
    with open(path, "a") as f:
        f.write(f"done {tag} {os.getpid()}\n")


@job
def nl_chaos(key, jid, seconds=0.02):
    """A short job for the chaos test: works ``seconds``, then records its id in a set (completion) and a list
    (every completed run, so duplicates can be counted)."""
    time.sleep(seconds)
    # one atomic step (a script: also on the suites' cluster runs, where ``key`` is hash-tagged, e.g. ``{chaos}``)
    r().eval("redis.call('SADD', KEYS[1], ARGV[1]) redis.call('RPUSH', KEYS[2], ARGV[1])", 2, key + ":done",
             key + ":runs", jid)


_BUSY_SCRIPT = ("local t0 = redis.call('TIME') local s = tonumber(ARGV[1]) "
                "while true do local t = redis.call('TIME') "
                "if (t[1] - t0[1]) + (t[2] - t0[2]) / 1e6 >= s then break end end return 1")


@job
def nl_stall_redis(seconds):
    """Makes Redis stall for ``seconds`` (a busy Lua script: the server serves nobody meanwhile, as during a
    failover or a slow fork), sent on a raw socket without waiting for the reply, then returns at once, so the
    worker's record-and-claim call for this job lands on the stalled server."""
    url = urlsplit(os.environ["REDIS_URL"])
    sock = socket.create_connection((url.hostname, url.port or 6379))
    parts = ["EVAL", _BUSY_SCRIPT, "0", str(seconds)]
    sock.sendall((f"*{len(parts)}\r\n" + "".join(f"${len(p.encode())}\r\n{p}\r\n" for p in parts)).encode())
    time.sleep(0.1)  # the server has read the script and is running it
