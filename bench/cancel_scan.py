"""What cancel() costs on a long queue (issue 24 item 2): cancel.lua finds the job by scanning its queue, O(length).
Times one cancel of the last job of a ``--jobs`` queue (the worst case), and of the first, ``--rounds`` times.

    .venv/bin/python bench/cancel_scan.py [--jobs 100000] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

from bench import scratch_redis, use_module_broker  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    with scratch_redis() as (url, r):
        import worker.sample  # noqa: F401
        from worker import cancel, jobs as wjobs
        use_module_broker(url)
        last, first = [], []
        for _ in range(a.rounds):
            r.flushall()
            ids = wjobs.enqueue_many("noop", [[] for _ in range(a.jobs)])
            t0 = time.perf_counter()
            assert cancel(ids[-1])
            last.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            assert cancel(ids[0])
            first.append((time.perf_counter() - t0) * 1000)
        print(f"cancel on a {a.jobs}-job queue, {a.rounds} rounds: last job (whole queue scanned) median "
              f"{statistics.median(last):.1f} ms (max {max(last):.1f}); first job median "
              f"{statistics.median(first):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
