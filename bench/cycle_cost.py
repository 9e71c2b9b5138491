"""Redis's time per job in the claim/record script alone, ours against the runtime before issue 9, same server.

    .venv/bin/python bench/cycle_cost.py            # or bench/.venv/bin/python; --rounds R --batch B
    .venv/bin/python bench/cycle_cost.py --baseline main   # what a change costs per job: ours vs REV, <= +5 %

No worker process: one loop per runtime plays a single-slot worker, calling CYCLE once per job (record job k's
outcome, claim job k+1; beating every 5 s, tidying every 100 ms and registered with P:epoch, as the supervisor
does), over no-op payloads written by today's producer. Three loops, each in a subprocess importing its own
``worker`` package and using a key prefix of its own, on one redis-server:

* ``before #9``: the runtime before issue 9 (``git archive 9a39a1e``, as bench/concurrency.py does);
* ``ours``: this checkout, as it runs (each job's status record, ``P:job:<id>``, updated at its outcome: issue 12);
* ``ours, no status record``: the same script with the job ids left out of the outcomes (its "keep no status"
  path), i.e. ours without what issue 12 added per job.

They take turns of ``--batch`` calls (order alternating), ``--rounds`` times; the first round is a warm-up. The
figure is ``INFO commandstats`` EVALSHA usec (which includes the commands inside the script) summed over each
runtime's turns / its calls. Fine-grained turns on one server put machine drift on every runtime alike (sequential
runs on this VM moved by ±10 %). Targets: ours ≤ 1.2 × before (#12: status records within +20 %); ours without
the status record ≤ 1.0 × before (#9: the concurrency rewrite costs Redis nothing per job).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(REPO))

LOOP = r"""
import json, sys, time, dataclasses
sys.path.insert(0, sys.argv[1])
import redis
from worker import config
from worker.fetch import Broker, Outcome
url, rounds, batch, prefix, status = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6] == "1"
r = redis.Redis.from_url(url, decode_responses=True)
b = Broker(redis.Redis.from_url(url, decode_responses=True),
           config.from_mapping({"REDIS_URL": url, "KEY_PREFIX": prefix}))
new = hasattr(Outcome, "wire")
if new:  # registered, as a running worker is: CYCLE checks P:epoch when it needs to
    r.set(b.keys.epoch, "bench-epoch")
    b.epoch = "bench-epoch"
c = b.cycle("w:1", [], [0], 0, "") if new else b.cycle("w:1", None, claim=True)  # loads the script
prev, at = (c.claims[0].payload, c.claims[0].at) if new else (c.payload, 0)
next_beat = next_tidy = time.monotonic()
for _ in range(rounds):
    r.blpop("go:" + prefix)
    for _ in range(batch):
        if new:  # as the supervisor calls it: beat when due (5 s), tidy every 100 ms, start time from the claim
            now = time.monotonic()
            beat, tidy = now >= next_beat, now >= next_tidy
            next_beat, next_tidy = (now + 5 if beat else next_beat), (now + 0.1 if tidy else next_tidy)
            ack = Outcome.ack(prev, 0, json.loads(prev)["id"] if status else "")
            c = b.cycle("w:1", [dataclasses.replace(ack, started_ms=at)], [0], 0, "", beat=beat, tidy=tidy)
            prev, at = (c.claims[0].payload, c.claims[0].at)
        else:
            prev = b.cycle("w:1", Outcome.ack(prev), claim=True).payload
    r.rpush("done:" + prefix, 1)
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=21, help="turns per runtime (the first is a warm-up)")
    ap.add_argument("--batch", type=int, default=500, help="CYCLE calls per turn")
    ap.add_argument("--baseline", metavar="REV",
                    help="compare with the runtime at git REV (e.g. main) instead of before #9: target <= 1.05x")
    args = ap.parse_args(argv)
    from concurrency import BASELINE_REV, baseline_source
    rev = args.baseline or BASELINE_REV
    if args.baseline:  # a name like `main` moves: archive the commit it names now
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.baseline], capture_output=True,
                             text=True).stdout.strip() or args.baseline
    base = baseline_source(rev)
    if base is None:
        print(f"cannot extract {rev} with git archive")
        return 1
    if args.baseline:
        runs = [(f"baseline ({rev})", base, True), ("ours", REPO, True)]
    else:
        runs = [(f"before #9 ({rev})", base, True), ("ours", REPO, True), ("ours, no status record", REPO, False)]
    mean = measure(runs, args.rounds, args.batch)
    if args.baseline:
        ours = mean[1] / mean[0]
        print(f"  ours / baseline               {ours:.3f}x   target <= 1.05x   {'MET' if ours <= 1.05 else 'MISSED'}")
        return 0
    ours, bare = mean[1] / mean[0], mean[2] / mean[0]
    print(f"  ours / before                 {ours:.2f}x   target <= 1.2x (#12)   {'MET' if ours <= 1.2 else 'MISSED'}")
    print(f"  ours, no status / before      {bare:.2f}x   target <= 1.0x (#9)    {'MET' if bare <= 1.0 else 'MISSED'}")
    return 0


def measure(runs: list, rounds: int, batch: int) -> list:
    """Mean EVALSHA µs per call of each of ``runs`` = ``[(label, source dir, status records?), ...]``, printed."""
    import redis
    from tests.support import free_port, start_redis_server
    from worker import config
    from worker.fetch import Broker
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        srv = start_redis_server(port, tmp)
        url = f"redis://127.0.0.1:{port}/0"
        r = redis.Redis(port=port, decode_responses=True)
        procs = []
        try:
            for i, (_, src, status) in enumerate(runs):
                Broker(redis.Redis(port=port, decode_responses=True),
                       config.from_mapping({"REDIS_URL": url, "KEY_PREFIX": f"p{i}"})).push_many(
                    "noop", [[] for _ in range(rounds * batch + 2)])
                procs.append(subprocess.Popen([sys.executable, "-c", LOOP, str(src), url, str(rounds),
                                               str(batch), f"p{i}", "1" if status else "0"]))

            def evalsha():
                s = r.info("commandstats")["cmdstat_evalsha"]
                return s["calls"], s["usec"]

            calls, usec, per_turn = [0] * len(runs), [0] * len(runs), [[] for _ in runs]
            for k in range(rounds):
                order = list(range(len(runs))) if k % 2 == 0 else list(range(len(runs)))[::-1]
                for i in order:
                    c0, u0 = evalsha()
                    r.rpush(f"go:p{i}", 1)
                    if r.blpop(f"done:p{i}", 120) is None:
                        raise RuntimeError(f"{runs[i][0]}: no answer in 120 s")
                    c1, u1 = evalsha()
                    if k > 0:  # the first round warms up
                        calls[i] += c1 - c0
                        usec[i] += u1 - u0
                        per_turn[i].append((u1 - u0) / (c1 - c0))
            for p in procs:
                if p.wait(60) != 0:
                    raise RuntimeError("a loop failed")
        finally:
            for p in procs:
                p.kill()
            srv.kill()
            srv.wait(10)
    mean = [u / c for u, c in zip(usec, calls)]
    print(f"EVALSHA µs per job (commandstats), {rounds - 1} turns of {batch} calls per runtime, "
          f"alternating, one redis-server:")
    for (name, _, _), m, t in zip(runs, mean, per_turn):
        print(f"  {name:28s} mean {m:5.1f}   per-turn median {statistics.median(t):5.1f}   "
              f"÷ first {m / mean[0]:.2f}x")
    return mean


if __name__ == "__main__":
    sys.exit(main())
