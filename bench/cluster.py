"""Redis Cluster (issue 26): Redis CPU per job on each node and the total drain rate, in one run.

    .venv/bin/python bench/cluster.py            # --jobs N (default 3000) --workers W (default 3)

Three set-ups, each draining ``--jobs`` no-op jobs (``worker.sample.noop``) with ``--workers`` burst workers
(``python -m worker --burst``, WORKER_CONCURRENCY=1), on redis-servers of its own (tests/support.py):

* ``single``: one redis-server, one key space (``worker:``): the baseline;
* ``cluster x1``: a 3-primary cluster, ``REDIS_CLUSTER=1``, one key space (``{worker}:``): all its load is on the
  one primary that holds its slot;
* ``cluster x3``: the same cluster, three key spaces whose hash tags land on three different primaries
  (``KEY_PREFIX`` per deployment: the sharding available today; queue groups, issue 26 point 2, would do it in one
  deployment), the jobs and workers split evenly between them.

Per node: ``INFO cpu`` (used_cpu_sys + used_cpu_user) before and after, divided by the jobs that node served. On this
2-core machine the workers (fork per job) are the limit, not Redis: the figures that show the headroom are the CPU
per job of each primary (its capacity is about 1 / that), and how the load spreads across primaries.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.support import CONFIG_VARS, LocalCluster, free_port, start_redis_server  # noqa: E402
from worker.client import connect  # noqa: E402
from worker.config import from_mapping  # noqa: E402
from worker.fetch import Broker  # noqa: E402


def cpu(port: int) -> float:
    c = redis.Redis(port=port)
    try:
        i = c.info("cpu")
        return float(i["used_cpu_sys"]) + float(i["used_cpu_user"])
    finally:
        c.close()


def tags_on_distinct_primaries(cluster: LocalCluster, n: int) -> list:
    """``n`` KEY_PREFIX values whose ``{prefix}`` hash tags are held by ``n`` different primaries."""
    out, homes = [], set()
    for i in range(1000):
        home = cluster.node_of("{" + f"g{i}" + "}")
        if home not in homes:
            homes.add(home)
            out.append(f"g{i}")
        if len(out) == n:
            return out
    raise RuntimeError("no spread of hash tags found")


def drain(url: str, ports: list, spaces: list, jobs: int, workers: int, cluster: bool) -> dict:
    """Enqueue ``jobs`` split over key spaces ``spaces``, run ``workers`` burst workers split likewise; timings."""
    base = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    base.update(REDIS_URL=url, JOB_MODULES="worker.sample", PYTHONPATH=str(REPO), LOG_LEVEL="WARNING")
    if cluster:
        base["REDIS_CLUSTER"] = "1"
    for prefix in spaces:
        cfg = from_mapping({**base, "KEY_PREFIX": prefix})
        b = Broker(connect(cfg), cfg)
        b.push_many("noop", [[] for _ in range(jobs // len(spaces))])
        b.r.close()
    before = {p: cpu(p) for p in ports}
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "worker", "--burst"], cwd=str(REPO),
                              env={**base, "KEY_PREFIX": spaces[i % len(spaces)]}, stdout=subprocess.DEVNULL)
             for i in range(workers)]
    for p in procs:
        if p.wait(600) != 0:
            raise RuntimeError("a worker failed")
    wall = time.monotonic() - t0
    used = {p: cpu(p) - before[p] for p in ports}
    return {"wall": wall, "rate": jobs / wall, "cpu": used}


def report(name: str, res: dict, jobs: int, per_node_jobs: dict) -> None:
    print(f"{name:<12} {res['rate']:8.0f} jobs/s  ({jobs} jobs in {res['wall']:.1f} s)")
    for port, used in res["cpu"].items():
        n = per_node_jobs.get(port, 0)
        per = f"{used / n * 1e6:7.1f} us/job" if n else "      - idle"
        print(f"{'':<12}   node :{port}  Redis CPU {used:6.2f} s  {per}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=3)
    a = ap.parse_args()
    jobs = a.jobs - a.jobs % 3
    why = LocalCluster.why_not()
    if why:
        sys.exit(f"bench/cluster.py: {why}")
    work = Path(tempfile.mkdtemp())
    port = free_port()
    single = start_redis_server(port, work)
    cluster = LocalCluster(work / "cluster").start()
    try:
        res = drain(f"redis://127.0.0.1:{port}/0", [port], ["worker"], jobs, a.workers, False)
        report("single", res, jobs, {port: jobs})
        prim = [p for p in cluster.ports]
        res = drain(cluster.url, prim, ["worker"], jobs, a.workers, True)
        report("cluster x1", res, jobs, {cluster.node_of("{worker}"): jobs})
        cluster.flush()
        spaces = tags_on_distinct_primaries(cluster, 3)
        res = drain(cluster.url, prim, spaces, jobs, a.workers, True)
        report("cluster x3", res, jobs, {cluster.node_of("{" + s + "}"): jobs // 3 for s in spaces})
    finally:
        cluster.stop()
        single.kill()
        single.wait(10)


if __name__ == "__main__":
    main()
