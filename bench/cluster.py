"""Redis Cluster (issue 26): Redis CPU per job on each node and the total drain rate, in one run.

    .venv/bin/python bench/cluster.py            # --jobs N (default 3000) --workers W (default 3)

Three set-ups, each draining ``--jobs`` no-op jobs (``worker.sample.noop``) with ``--workers`` burst workers
(``python -m worker --burst``, WORKER_CONCURRENCY=1), on redis-servers of its own (tests/support.py):

* ``single``: one redis-server, one key space (``worker:``): the baseline;
* ``cluster x1``: a 3-primary cluster, ``REDIS_CLUSTER=1``, one key space (``{worker}:``): all its load is on the
  one primary that holds its slot;
* ``cluster x3``: the same cluster, three key spaces whose hash tags land on three different primaries
  (``KEY_PREFIX`` per deployment), the jobs and workers split evenly between them;
* ``groups x1``: one deployment with ``QUEUE_GROUPS`` of one group (``{worker:gN}``) on one primary, all workers
  ``QUEUES=@gN``;
* ``groups x3``: one deployment with ``QUEUE_GROUPS`` of three groups whose hash tags land on the three primaries
  (``{worker:gA}``, ...), one queue each; one producer routes the jobs by queue, the workers serve one group each.

Per node: ``INFO cpu`` (used_cpu_sys + used_cpu_user) and ``INFO commandstats`` (the sum of ``usec`` over commands:
the time spent in commands and scripts only) before and after, divided by the jobs that node served. On this 2-core
machine the workers (fork per job) are the limit, not Redis: the figures that show the headroom are the CPU per job of
each primary (its capacity is about 1 / that: ``ceiling``), and how the load spreads across primaries.
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


def cpu(port: int) -> tuple:
    """``(CPU seconds of the server, seconds spent in commands)`` from INFO cpu and INFO commandstats."""
    c = redis.Redis(port=port)
    try:
        i = c.info("cpu")
        cmd = sum(v["usec"] for k, v in c.info("commandstats").items() if k.startswith("cmdstat_")) / 1e6
        return float(i["used_cpu_sys"]) + float(i["used_cpu_user"]), cmd
    finally:
        c.close()


def _spread(cluster: LocalCluster, n: int, tag) -> list:
    """``n`` names ``g0``, ``g1``, ... whose hash tags ``tag(name)`` are held by ``n`` different primaries."""
    out, homes = [], set()
    for i in range(1000):
        home = cluster.node_of(tag(f"g{i}"))
        if home not in homes:
            homes.add(home)
            out.append(f"g{i}")
        if len(out) == n:
            return out
    raise RuntimeError("no spread of hash tags found")


def groups_on_distinct_primaries(cluster: LocalCluster, n: int, root: str = "worker") -> list:
    """``n`` QUEUE_GROUPS names whose ``{root:name}`` hash tags are held by ``n`` different primaries."""
    return _spread(cluster, n, lambda name: "{" + f"{root}:{name}" + "}")


def tags_on_distinct_primaries(cluster: LocalCluster, n: int) -> list:
    """``n`` KEY_PREFIX values whose ``{prefix}`` hash tags are held by ``n`` different primaries."""
    return _spread(cluster, n, lambda name: "{" + name + "}")


def drain(url: str, ports: list, spaces: list, jobs: int, workers: int, cluster: bool, groups=None) -> dict:
    """Enqueue ``jobs`` split over key spaces ``spaces``, run ``workers`` burst workers split likewise; timings.
    ``groups``: the names of a QUEUE_GROUPS deployment (group g holds queue ``q<g>``; ``spaces`` is then ignored):
    one producer routes by queue, each worker serves one group (``QUEUES=@g``)."""
    base = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    base.update(REDIS_URL=url, JOB_MODULES="worker.sample", PYTHONPATH=str(REPO), LOG_LEVEL="WARNING")
    if cluster:
        base["REDIS_CLUSTER"] = "1"
    if groups:
        base["QUEUE_GROUPS"] = ";".join(f"{g}=q{g}" for g in groups)
        cfg = from_mapping(base)
        b = Broker(connect(cfg), cfg)
        for g in groups:
            b.push_many("noop", [[] for _ in range(jobs // len(groups))], queue=f"q{g}")
        b.r.close()
        envs = [{**base, "QUEUES": f"@{g}"} for g in groups]
    else:
        for prefix in spaces:
            cfg = from_mapping({**base, "KEY_PREFIX": prefix})
            b = Broker(connect(cfg), cfg)
            b.push_many("noop", [[] for _ in range(jobs // len(spaces))])
            b.r.close()
        envs = [{**base, "KEY_PREFIX": prefix} for prefix in spaces]
    before = {p: cpu(p) for p in ports}
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "worker", "--burst"], cwd=str(REPO),
                              env=envs[i % len(envs)], stdout=subprocess.DEVNULL)
             for i in range(workers)]
    for p in procs:
        if p.wait(600) != 0:
            raise RuntimeError("a worker failed")
    wall = time.monotonic() - t0
    after = {p: cpu(p) for p in ports}
    used = {p: (after[p][0] - before[p][0], after[p][1] - before[p][1]) for p in ports}
    return {"wall": wall, "rate": jobs / wall, "cpu": used}


def report(name: str, res: dict, jobs: int, per_node_jobs: dict) -> None:
    """One set-up: the drain rate; per node its Redis CPU (and time in commands) per job served; ``ceiling``: the
    jobs/s the busy primaries could serve at that CPU per job (sum of 1 / CPU per job over the primaries used)."""
    ceiling = sum(n / used for p, (used, _) in res["cpu"].items() if (n := per_node_jobs.get(p, 0)) and used > 0)
    print(f"{name:<12} {res['rate']:8.0f} jobs/s  ({jobs} jobs in {res['wall']:.1f} s); "
          f"Redis-side ceiling ~{ceiling:,.0f} jobs/s")
    for port, (used, cmd) in res["cpu"].items():
        n = per_node_jobs.get(port, 0)
        per = f"{used / n * 1e6:7.1f} us/job ({cmd / n * 1e6:5.1f} us in commands)" if n else "      - idle"
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
        cluster.flush()
        names = groups_on_distinct_primaries(cluster, 3)
        res = drain(cluster.url, prim, [], jobs, a.workers, True, groups=names[:1])
        report("groups x1", res, jobs, {cluster.node_of("{worker:" + names[0] + "}"): jobs})
        cluster.flush()
        res = drain(cluster.url, prim, [], jobs, a.workers, True, groups=names)
        report("groups x3", res, jobs, {cluster.node_of("{worker:" + g + "}"): jobs // 3 for g in names})
    finally:
        cluster.stop()
        single.kill()
        single.wait(10)


if __name__ == "__main__":
    main()
