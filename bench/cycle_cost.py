"""Redis's time per job in the claim/record script alone, ours against the runtime before issue 9, same run.

    bench/.venv/bin/python bench/cycle_cost.py            # or: .venv/bin/python bench/cycle_cost.py

No worker process: this process plays the worker, calling CYCLE in a loop (record job k's outcome, claim job k+1:
one call per job, as a single slot does; beating every 5 s, tidying every 100 ms and registered with P:epoch, as
the supervisor does) over 5,000 no-op payloads on a redis-server of its own, and reads
``INFO commandstats`` (EVALSHA usec per call, which includes the commands inside the script). Each runtime runs in
a subprocess that imports its own ``worker`` package (the older one from ``git archive 9a39a1e``, as
bench/concurrency.py does); rounds alternate, and the minimum and median per runtime are printed. With no other
client and the server kept busy, this isolates the script's cost from the worker's rate, which the drain
benchmark's per-job figures depend on.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(REPO))

ONE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import redis
from worker import config
from worker.fetch import Broker, Outcome
url, n = sys.argv[2], int(sys.argv[3])
if True:
    if True:
        r = redis.Redis.from_url(url, decode_responses=True)
        b = Broker(redis.Redis.from_url(url, decode_responses=True), config.from_mapping({"REDIS_URL": url}))
        new = hasattr(Outcome, "wire")
        if hasattr(b, "epoch"):  # registered, as a running worker is: CYCLE checks P:epoch when it needs to
            r.set(b.keys.epoch, "bench-epoch")
            b.epoch = "bench-epoch"
        prev = None
        c = b.cycle("w:1", [], [0], 0, "") if new else b.cycle("w:1", None, claim=True)  # loads the script
        r.config_resetstat()
        prev = c.claims[0].payload if new else c.payload
        import dataclasses
        at = c.claims[0].at if new else 0
        next_beat = next_tidy = time.monotonic()
        for _ in range(n):
            if new:  # as the supervisor calls it: beat when due (5 s), tidy every 100 ms, start time from the claim
                now = time.monotonic()
                beat, tidy = now >= next_beat, now >= next_tidy
                next_beat, next_tidy = (now + 5 if beat else next_beat), (now + 0.1 if tidy else next_tidy)
                ack = dataclasses.replace(Outcome.ack(prev, 0, json.loads(prev)["id"]), started_ms=at)
                c = b.cycle("w:1", [ack], [0], 0, "", beat=beat, tidy=tidy)
                prev, at = (c.claims[0].payload, c.claims[0].at) if c.claims else (None, 0)
            else:
                c = b.cycle("w:1", Outcome.ack(prev), claim=True)
                prev = c.payload
        print(json.dumps(r.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]))
"""


def one(src: Path, n: int) -> float:
    """A redis-server of its own, ``n`` no-ops enqueued by today's producer (payloads and status records, as a
    user's app writes them), then the loop above run by the runtime in ``src``."""
    import redis
    from tests.support import free_port, start_redis_server
    from worker import config
    from worker.fetch import Broker
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        srv = start_redis_server(port, tmp)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            Broker(redis.Redis.from_url(url, decode_responses=True),
                   config.from_mapping({"REDIS_URL": url})).push_many("noop", [[] for _ in range(n)])
            res = subprocess.run([sys.executable, "-c", ONE, str(src), url, str(n)], capture_output=True, text=True,
                                 timeout=300)
            if res.returncode != 0:
                raise RuntimeError(res.stderr[-2000:])
            return float(res.stdout.strip())
        finally:
            srv.kill()
            srv.wait(10)


def main() -> int:
    from concurrency import baseline_source, BASELINE_REV
    base = baseline_source(BASELINE_REV)
    if base is None:
        print(f"cannot extract {BASELINE_REV} with git archive")
        return 1
    runs = {"before #9 (" + BASELINE_REV + ")": base, "ours": REPO}
    out = {k: [] for k in runs}
    for i in range(5):
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            out[name].append(one(runs[name], 5000))
    for name, v in out.items():
        print(f"{name:22s} EVALSHA µs per job: min {min(v):5.1f}  median {statistics.median(v):5.1f}  "
              f"({', '.join(f'{x:.1f}' for x in v)})")
    b, o = out["before #9 (" + BASELINE_REV + ")"], out["ours"]
    print(f"ours / before: {min(o) / min(b):.2f}x (min), {statistics.median(o) / statistics.median(b):.2f}x (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
