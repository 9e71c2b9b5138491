"""The dashboard's server time and Redis round trips per page, with a large backlog in Redis.

    .venv/bin/python bench/dashboard.py            # --queued 100000 --failed 10000 --workers 50 --slots 4 --runs 20

Starts its own redis-server, fills it with ``--queued`` waiting jobs (one queue), ``--failed`` failed records (5
job names, 3 error types, tracebacks of ~1 KB), ``--workers`` workers of ``--slots`` busy slots each, and 1,000
scheduled jobs; then calls the WSGI app directly (no HTTP server: server time only) ``--runs`` times per page and
prints the median and max time and the Redis round trips of one call. Round trips are counted by the connection
itself (every request written to the socket: a pipeline or a script is one). Target: every page < 100 ms median.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import redis  # noqa: E402

from tests.support import free_port, start_redis_server  # noqa: E402
from worker import config  # noqa: E402
from worker.keys import Keys  # noqa: E402
from worker.web import make_app  # noqa: E402


class CountingConnection(redis.Connection):
    trips = 0

    def send_packed_command(self, command, check_health=True):
        CountingConnection.trips += 1
        return super().send_packed_command(command, check_health)


def fill(r, k: Keys, queued: int, failed: int, workers: int, slots: int) -> str:
    now = time.time()
    tb = "Traceback (most recent call last):\n" + "  File \"app/jobs.py\", line 42, in run\n    do()\n" * 12
    with r.pipeline(transaction=False) as p:
        for i in range(queued):
            p.rpush(k.queue("default"), json.dumps({"id": f"q{i:08d}", "name": "send_email", "queue": "default",
                                                    "args": [f"user{i}@example.com", i], "kwargs": {},
                                                    "enqueued_at": now - queued + i, "attempts": 0}))
            if i % 5000 == 4999:
                p.execute()
        p.sadd(k.queues, "default", "mail")
        for i in range(failed):
            rec = {"id": f"f{i:08d}", "name": f"job{i % 5}", "queue": "default", "payload": json.dumps(
                {"id": f"f{i:08d}", "name": f"job{i % 5}", "queue": "default", "args": [i], "kwargs": {},
                 "enqueued_at": now, "attempts": 1}), "cause": "error", "type": ("ValueError", "KeyError",
                                                                                 "TimeoutError")[i % 3],
                   "message": f"failure {i}", "traceback": tb, "worker": "worker.1:4", "attempts": 1,
                   "failed_at": now - i, "history": []}
            p.zadd(k.failed, {rec["id"]: (now - i) * 1000})
            p.hset(k.failed_data, rec["id"], json.dumps(rec))
            if i % 2000 == 1999:
                p.execute()
        for w in range(workers):
            name = f"worker.{w + 1}:4"
            p.zadd(k.workers, {name: (now + 30) * 1000})
            info = {"state": "busy", "host": "h", "pid": 4, "dyno": f"worker.{w + 1}", "queues": "default",
                    "concurrency": slots, "seen": now * 1000, "ttl": 30000, "started": now - 3600}
            for s in range(slots):
                info[f"job:{s}"] = json.dumps({"id": f"r{w}-{s}", "name": "send_email", "queue": "default",
                                               "args": [], "kwargs": {}, "enqueued_at": now})
                info[f"started:{s}"] = (now - 5) * 1000
            p.hset(k.worker(name), mapping=info)
        for i in range(1000):
            p.zadd(k.scheduled, {json.dumps({"id": f"s{i}", "name": "later", "queue": "default", "args": [i],
                                             "kwargs": {}, "enqueued_at": now + 3600 + i}): (now + 3600 + i) * 1000})
        p.execute()
    r.hset(k.job("f00000007"), mapping={"status": "failed", "name": "job2", "queue": "default", "attempts": 1})
    r.hset(k.job("q00099999"), mapping={"status": "queued", "name": "send_email", "queue": "default"})
    return "f00000007"


def call(app, path):
    path, _, query = path.partition("?")
    env = {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": query,
           "HTTP_HOST": "bench", "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b""),
           "HTTP_AUTHORIZATION": "Basic " + __import__("base64").b64encode(b"x:benchmark-pass").decode()}
    out = {}
    body = b"".join(app(env, lambda status, headers: out.setdefault("status", status)))
    assert out["status"].startswith("200"), (path, out["status"], body[:300])
    return body


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queued", type=int, default=100_000)
    ap.add_argument("--failed", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=50)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--runs", type=int, default=20)
    a = ap.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_redis_server(port, Path(tmp))
        try:
            url = f"redis://127.0.0.1:{port}/0"
            cfg = config.from_mapping({"REDIS_URL": url, "DASHBOARD_PASSWORD": "benchmark-pass",
                                       "QUEUES": "default,mail"})
            plain = redis.Redis.from_url(url, decode_responses=True)
            t0 = time.perf_counter()
            failed_id = fill(plain, Keys(), a.queued, a.failed, a.workers, a.slots)
            print(f"filled in {time.perf_counter() - t0:.1f}s: {a.queued} queued, {a.failed} failed, "
                  f"{a.workers} workers x {a.slots} slots, 1000 scheduled")
            pool = redis.ConnectionPool(connection_class=CountingConnection, host="127.0.0.1", port=port,
                                        decode_responses=True)
            app = make_app(cfg, redis_client=redis.Redis(connection_pool=pool))
            pages = ["/", "/?live=1", "/queues/default", f"/queues/default?page={a.queued // 50}", "/failed",
                     "/failed?name=job3&type=KeyError", "/failed?page=100", f"/jobs/{failed_id}",
                     "/jobs/q00099999", "/jobs/r7-2", "/scheduled", "/periodic", "/metrics"]
            print(f"\n{'page':<34} {'median ms':>10} {'max ms':>8} {'round trips':>12} {'KB':>6}")
            worst = 0.0
            for page in pages:
                size = len(call(app, page))  # warm-up: scripts loaded
                times = []
                for _ in range(a.runs):
                    before = CountingConnection.trips
                    t = time.perf_counter()
                    call(app, page)
                    times.append((time.perf_counter() - t) * 1000)
                    trips = CountingConnection.trips - before
                med = statistics.median(times)
                worst = max(worst, med)
                print(f"{page:<34} {med:>10.1f} {max(times):>8.1f} {trips:>12} {size / 1024:>6.0f}")
            print(f"\nslowest page median: {worst:.1f} ms (target < 100 ms: {'met' if worst < 100 else 'NOT met'})")
        finally:
            server.kill()
            server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
