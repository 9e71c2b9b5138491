"""Redis's time per job in the claim/record script (CYCLE) for plain jobs and unique ones, same server, same run.

    .venv/bin/python bench/unique_cost.py            # --rounds R --batch B

Issue 25: a ``unique_until="start"`` job's claim frees its key (``P:unique:us:<key>``) in the same CYCLE call; every
other job pays one string compare on its claim. One process plays a single-slot worker for each of three key
prefixes in turn (``--batch`` CYCLE calls per turn, ``--rounds`` turns, the first a warm-up), each call recording the
previous job's outcome (with its status record) and claiming the next, over jobs enqueued beforehand by the real
producer: plain ``noop`` jobs, ``unique=True`` jobs (``u:`` ids: the job id is the lock) and ``unique_until="start"``
jobs (``us:`` ids, each holding its own lock). The figure is ``INFO commandstats`` EVALSHA µs summed over each kind's
turns / its calls (the claim's GET and DEL included for the last). For the hot path of jobs that do not use the
feature against main, use ``bench/cycle_cost.py --baseline main``.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=21, help="turns per kind (the first is a warm-up)")
    ap.add_argument("--batch", type=int, default=500, help="CYCLE calls per turn")
    args = ap.parse_args(argv)
    import redis
    from bench import scratch_redis
    from worker import config, job
    from worker.fetch import Broker, Outcome

    @job(name="bench_unique_end", unique=True)
    def _end(i):
        pass

    @job(name="bench_unique_start", unique=True, unique_until="start")
    def _start(i):
        pass

    kinds = [("plain", "noop"), ("unique (end)", "bench_unique_end"), ('unique_until="start"', "bench_unique_start")]
    n = args.rounds * args.batch + 2
    with scratch_redis() as (url, r):
        brokers, prev = [], []
        for i, (_, name) in enumerate(kinds):
            b = Broker(redis.Redis.from_url(url, decode_responses=True),
                       config.from_mapping({"REDIS_URL": url, "KEY_PREFIX": f"p{i}"}))
            if name == "noop":
                b.push_many(name, [[] for _ in range(n)])
            else:
                with b.r.pipeline(transaction=False) as pipe:
                    for j in range(n):
                        job_id, call = b.push_call(name, (j,), {})
                        b.scripts.run(call, pipe)
                    pipe.execute()
            r.set(b.keys.epoch, "bench-epoch")
            b.epoch = "bench-epoch"
            c = b.cycle("w:1", [], [0], 0, "", beat=True, tidy=False)
            brokers.append(b)
            prev.append((c.claims[0].payload, c.claims[0].at))
        locks = r.keys("p2:unique:*")
        assert len(locks) == n - 1, f"{len(locks)} unique_until='start' locks for {n - 1} waiting jobs"

        def evalsha():
            s = r.info("commandstats")["cmdstat_evalsha"]
            return s["calls"], s["usec"]

        import json
        calls, usec, per_turn = [0] * len(kinds), [0] * len(kinds), [[] for _ in kinds]
        for k in range(args.rounds):
            order = list(range(len(kinds))) if k % 2 == 0 else list(range(len(kinds)))[::-1]
            for i in order:
                b = brokers[i]
                c0, u0 = evalsha()
                p, at = prev[i]
                for _ in range(args.batch):
                    ack = dataclasses.replace(Outcome.ack(p, 0, json.loads(p)["id"]), started_ms=at)
                    c = b.cycle("w:1", [ack], [0], 0, "", beat=False, tidy=False)
                    p, at = c.claims[0].payload, c.claims[0].at
                prev[i] = (p, at)
                c1, u1 = evalsha()
                if k > 0:
                    calls[i] += c1 - c0
                    usec[i] += u1 - u0
                    per_turn[i].append((u1 - u0) / (c1 - c0))
        left = len(r.keys("p2:unique:*"))
        print(f"EVALSHA µs per job (commandstats), {args.rounds - 1} turns of {args.batch} CYCLE calls per kind, "
              f"alternating, one redis-server:")
        mean = [usec[i] / calls[i] for i in range(len(kinds))]
        for i, (label, _) in enumerate(kinds):
            print(f"  {label:24} mean {mean[i]:6.1f}   per-turn median {statistics.median(per_turn[i]):6.1f}   "
                  f"÷ plain {mean[i] / mean[0]:.2f}x")
        print(f"  unique_until='start' locks left after {(args.rounds) * args.batch} claims: {left} "
              f"(of {n - 1} waiting at the start)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
