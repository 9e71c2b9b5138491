"""Shutdown latencies of the SIGTERM contract (issue 3), measured under the Heroku emulator (tests/dyno.py).

    make bench-shutdown                                  # = .venv/bin/python bench/shutdown.py
    .venv/bin/python bench/shutdown.py --runs 20 [--quick]

Scenarios (a fresh ``python -m worker`` per run, default SHUTDOWN_WINDOW=10, on a redis-server of its own):

* busy, Heroku:  a ``term_probe`` job (tests/jobs.py: records time.time() the moment it catches TermException, then
                 cleans up 0.5 s and returns) gets SIGTERM on every process. Measures SIGTERM -> TermException
                 (job clock minus the emulator's clock just before its first kill) and SIGTERM -> last process gone.
* busy, foreman: the same with SIGTERM to the parent only (the parent relays it to the child).
* idle:          SIGTERM to an idle worker (blocked in its claim) -> gone.
* stubborn:      a job that swallows every exception; killed at TERM_TIMEOUT (8.5 s), so this one takes ~9 s per run
                 (``--quick`` runs it 3 times instead of ``--runs``).

Every run also checks that the emulator did not have to SIGKILL anything and the worker exited 0. Prints
min/median/max against the targets and writes bench/out/shutdown.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OUT = BENCH / "out"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import redis  # noqa: E402

from tests import dyno  # noqa: E402
from tests.support import CONFIG_VARS, free_port  # noqa: E402  (the emulator: one implementation for tests and bench)
from worker.config import from_mapping  # noqa: E402
from worker.fetch import Broker  # noqa: E402

WINDOW = 10.0
# The runtime's variables are stripped from the workers' environment (and their cwd is a temp dir, so no .env):
# a developer's shell cannot change what is measured.


class Worker:
    """``python -m worker`` in its own session (so it leads its group, as on a dyno), lines collected."""

    def __init__(self, redis_url: str, cwd: str, **env):
        e = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
        e.update(REDIS_URL=redis_url, JOB_MODULES="worker.sample,tests.jobs", PYTHONPATH=str(REPO),
                 PYTHONUNBUFFERED="1", SHUTDOWN_WINDOW=str(WINDOW), **env)
        self.p = subprocess.Popen([sys.executable, "-m", "worker"], env=e, cwd=cwd, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines = []
        self.started = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))
            if "event=worker.start" in line:
                self.started.set()

    def wait_start(self):
        if not self.started.wait(15):
            raise RuntimeError("worker did not start:\n" + "\n".join(self.lines))

    def finish(self) -> int:
        try:
            return self.p.wait(15)
        except subprocess.TimeoutExpired:
            for pid in dyno.tree(self.p.pid):  # never leave a process behind
                os.kill(pid, 9)
            raise RuntimeError("worker still running 15 s after the shutdown:\n" + "\n".join(self.lines))


def poll(what, fn, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.005)


class Bench:
    def __init__(self, url: str, cwd: str):
        self.url, self.cwd = url, cwd
        self.r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=30)  # > the BLPOP below
        self.broker = Broker(self.r, from_mapping({"REDIS_URL": url}))
        self.kills = {}

    def _run(self, name, job=None, mode="dyno", **job_kwargs):
        """One worker, optionally one job running, one emulated shutdown. Returns (report, events)."""
        self.r.flushall()
        w = Worker(self.url, self.cwd)
        w.wait_start()
        if job:
            self.broker.push(job, ["ev"], job_kwargs)
            first = self.r.blpop("ev", 15)
            assert first and json.loads(first[1])["event"] == "started", first
            poll("the job to sleep", lambda: dyno.sleeping(w.p.pid))  # inside its try: see dyno.sleeping
        else:
            poll("the worker to go idle", lambda: any(
                self.r.hget(k, "state") == "idle" for k in self.r.keys("worker:worker:*")))
        rep = dyno.shutdown(w.p.pid, mode=mode, window=WINDOW)
        code = w.finish()
        if code != 0:
            raise RuntimeError(f"{name}: worker exited {code}:\n" + "\n".join(w.lines))
        self.kills[name] = self.kills.get(name, 0) + rep.sigkilled
        return rep, [json.loads(x) for x in self.r.lrange("ev", 0, -1)]

    def busy(self, mode):
        rep, events = self._run(f"busy-{mode}", "term_probe", mode=mode, cleanup=0.5)
        term = [e for e in events if e["event"] == "term"]
        assert len(term) == 1 and events[-1]["event"] == "cleaned", events
        return (term[0]["t"] - rep.signal_wall) * 1000, rep.last_exit

    def idle(self):
        rep, _ = self._run("idle")
        return rep.last_exit * 1000

    def stubborn(self):
        rep, events = self._run("stubborn", "stubborn")
        assert [e["type"] for e in events] == ["TermException"], events
        assert self.r.llen("worker:queue:default") == 1, "stubborn job not put back"
        return rep.last_exit


def summary(values, unit, target, kills):
    return {"unit": unit, "n": len(values), "min": min(values), "median": statistics.median(values),
            "max": max(values), "target": target, "sigkilled_runs": kills, "values": values}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20, help="runs per scenario (default 20)")
    ap.add_argument("--quick", action="store_true", help="run the ~9 s stubborn scenario 3 times only")
    args = ap.parse_args()
    stubborn_runs = 3 if args.quick else args.runs
    binary = shutil.which("redis-server")
    if not binary:
        sys.exit("redis-server is not installed")
    tmp = tempfile.mkdtemp(prefix="bench-shutdown-")  # also the workers' cwd: no stray .env
    port = free_port()
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                               "no", "--dir", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        poll("redis-server", lambda: _ping(url))
        b = Bench(url, tmp)
        lat, busy_exit, lat_parent, idle, stub = [], [], [], [], []
        for i in range(args.runs):
            ms, s = b.busy("dyno")
            lat.append(ms)
            busy_exit.append(s)
            lat_parent.append(b.busy("parent")[0])
            idle.append(b.idle())
            print(f"\rrun {i + 1}/{args.runs}", end="", flush=True)
        for i in range(stubborn_runs):
            stub.append(b.stubborn())
            print(f"\rstubborn run {i + 1}/{stubborn_runs}", end="", flush=True)
        print()
    finally:
        server.kill()
        server.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    k = b.kills
    results = {
        "term_latency_heroku": summary(lat, "ms", {"median_max": 50.0}, k["busy-dyno"]),
        "term_latency_parent_only": summary(lat_parent, "ms", {"median_max": 50.0}, k["busy-parent"]),
        "idle_exit": summary(idle, "ms", {"median_max": 200.0}, k["idle"]),
        "busy_graceful_exit": summary(busy_exit, "s", {"max_max": WINDOW - 0.5}, k["busy-dyno"]),
        "stubborn_exit": summary(stub, "s", {"max_max": WINDOW - 0.5}, k["stubborn"]),
    }
    labels = {
        "term_latency_heroku": "SIGTERM -> TermException (Heroku: every process)",
        "term_latency_parent_only": "SIGTERM -> TermException (foreman: parent only)",
        "idle_exit": "idle: SIGTERM -> worker gone",
        "busy_graceful_exit": "busy, 0.5 s cleanup: SIGTERM -> gone",
        "stubborn_exit": "stubborn job: SIGTERM -> gone",
    }
    print(f"\n{'scenario':50} {'n':>3} {'min':>9} {'median':>9} {'max':>9}  target             SIGKILLed")
    ok = True
    for name, s in results.items():
        t = s["target"]
        if "median_max" in t:
            passed, text = s["median"] <= t["median_max"], f"median <= {t['median_max']:g} {s['unit']}"
        else:
            passed, text = s["max"] <= t["max_max"], f"max <= {t['max_max']:g} {s['unit']}"
        passed = passed and s["sigkilled_runs"] == 0
        ok &= passed
        s["ok"] = passed
        fmt = "{:9.1f}" if s["unit"] == "ms" else "{:9.3f}"
        figures = " ".join(fmt.format(s[x]) for x in ("min", "median", "max"))
        print(f"{labels[name]:50} {s['n']:3} {figures}  {text:18} {s['sigkilled_runs']}/{s['n']}"
              f"  {'ok' if passed else 'MISSED'}")
    print("(ms for latencies and idle exit, s for the others; SHUTDOWN_WINDOW=10, TERM_TIMEOUT=8.5)")
    OUT.mkdir(exist_ok=True)
    doc = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": platform.python_version(),
           "cpus": os.cpu_count(), "window": WINDOW, "runs": args.runs, "stubborn_runs": stubborn_runs,
           "all_ok": ok, "results": results}
    (OUT / "shutdown.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {OUT / 'shutdown.json'}")
    return 0 if ok else 1


def _ping(url):
    try:
        return redis.Redis.from_url(url, socket_connect_timeout=0.2).ping()
    except redis.ConnectionError:
        return False


if __name__ == "__main__":
    sys.exit(main())
