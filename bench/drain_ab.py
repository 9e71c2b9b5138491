"""Single-slot drain, two source trees in alternating rounds (same machine, same run): wall time of
``python -m worker --burst`` draining N ``noop`` jobs (JOB_MODULES=worker.sample, one slot) and Redis commands per
job (``INFO commandstats``, reset before each drain: a script's inner commands count too).

    git archive main worker | tar -x -C /tmp/base     # the tree to compare against
    git archive HEAD worker | tar -x -C /tmp/new
    .venv/bin/python bench/drain_ab.py /tmp/base /tmp/new 2000 8

Prints each tree's median wall, jobs/s and commands/job, and the ratio new/base of the median walls.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import redis  # noqa: E402

from tests.support import free_port, start_redis_server  # noqa: E402


def main(base: str, new: str, n: int, rounds: int) -> None:
    trees = {"base": base, "new": new}
    port = free_port()
    srv = start_redis_server(port, tempfile.mkdtemp())
    url = f"redis://127.0.0.1:{port}/0"
    r = redis.Redis.from_url(url, decode_responses=True)
    res: dict = {k: [] for k in trees}
    try:
        for i in range(rounds):
            order = list(trees.items()) if i % 2 == 0 else list(trees.items())[::-1]
            for name, src in order:
                r.flushall()
                env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME")}
                env.update({"REDIS_URL": url, "QUEUES": "default", "JOB_MODULES": "worker.sample",
                            "LOG_LEVEL": "WARNING", "PYTHONPATH": src})
                subprocess.run([sys.executable, "-c", f"import worker, worker.sample\n"
                                f"worker.enqueue_many('noop', [[] for _ in range({n})])"],
                               env=env, cwd=tempfile.gettempdir(), check=True, timeout=120)
                r.config_resetstat()
                t0 = time.monotonic()
                subprocess.run([sys.executable, "-m", "worker", "--burst"], env=env, cwd=tempfile.gettempdir(),
                               check=True, stdout=subprocess.DEVNULL, timeout=600)
                wall = time.monotonic() - t0
                calls = sum(v["calls"] for v in r.info("commandstats").values())
                assert r.llen("worker:queue:default") == 0
                res[name].append((wall, calls / n))
        for name, v in res.items():
            wall = statistics.median(w for w, _ in v)
            print(f"{name}: median wall {wall:.3f} s, {n / wall:.0f} jobs/s, "
                  f"{statistics.median(c for _, c in v):.2f} Redis commands/job, walls {[round(w, 3) for w, _ in v]}")
        print("ratio new/base (median wall):",
              round(statistics.median(w for w, _ in res["new"]) / statistics.median(w for w, _ in res["base"]), 3))
    finally:
        srv.kill()
        srv.wait()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
