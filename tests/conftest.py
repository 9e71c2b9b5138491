"""Shared fixtures: a real redis-server on a free port, and real worker processes.

Synchronise on events (a job RPUSHes to a Redis list, the test BLPOPs it; or a worker's log line), never on sleeps.
Every spawned process is killed at teardown, whole tree, so a failing test cannot leave a worker behind.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
from tests.support import (CONFIG_VARS, LocalCluster, client_for, descendants,  # noqa: F401,E402 (descendants: tests)
                           free_port, start_redis_server)
from worker.keys import Keys  # noqa: E402


class RedisServer:
    """A redis-server of the test session's own; ``stop()``/``start()`` emulate an outage on the same port."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.proc = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        if not shutil.which("redis-server"):
            pytest.exit("redis-server is not installed (the CI script installs it with apt-get)", 2)
        self.proc = start_redis_server(self.port, self.workdir)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A real 3-primary Redis Cluster on loopback ports (issue 26 point 4), started once per session when a test asks
    for it; skipped, with the reason, where redis-server/redis-cli cannot make one. ``.url`` is one node's URL."""
    why = LocalCluster.why_not()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"no local Redis Cluster in CI: {why}")
        pytest.skip(f"no local Redis Cluster: {why}")
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# --- the backend: one redis-server, or the local 3-primary cluster (issue 26 point 4) ---

class Backend:
    """Where a test's Redis is: ``kind`` "single" (the session's redis-server) or "cluster" (the session's local
    Redis Cluster, keys ``{worker}:...``). ``env`` is what a worker needs to reach it (REDIS_URL, REDIS_CLUSTER);
    ``client()`` a test client (tests/support.py client_for), ``keys`` the key schema (worker/keys.py) there."""

    def __init__(self, kind: str, server):
        from worker.config import from_mapping
        self.kind, self.server = kind, server
        self.env = {"REDIS_URL": server.url, **({"REDIS_CLUSTER": "1"} if kind == "cluster" else {})}
        self.cfg = from_mapping(self.env)
        self.keys = Keys(self.cfg.key_prefix)

    @property
    def cluster(self) -> bool:
        return self.kind == "cluster"

    def config(self, **env):
        from worker.config import from_mapping
        return from_mapping({**self.env, **env})

    def client(self):
        """A new client (the caller closes it)."""
        return client_for(self.cfg)

    def shared_client(self):
        """The session's test client for this backend (``r``): on the cluster made once, as a RedisCluster's start-up
        reads the COMMAND table (~0.1 s), and its slot map re-read for each test (another test may have moved the
        key space's slot)."""
        if not self.cluster:
            return client_for(self.cfg)
        client = getattr(self.server, "test_client", None)
        if client is None:
            client = self.server.test_client = client_for(self.cfg)
        else:
            client.cluster.nodes_manager.initialize()
        return client

    def flush(self) -> None:
        if self.cluster:
            self.server.flush()
        else:
            if self.server.proc.poll() is not None:  # a test stopped it and failed before restarting
                self.server.start()
            c = redis.Redis.from_url(self.server.url)
            try:
                c.flushall()
            finally:
                c.close()


BACKENDS = [pytest.param("single", id="single"), pytest.param("cluster", id="cluster", marks=pytest.mark.cluster)]


def pytest_generate_tests(metafunc):
    """Tests in a module marked ``both_backends`` that use Redis (the ``backend`` fixture, through ``r``, ``env``,
    ``spawn``...) run once per backend: ``[single]`` and ``[cluster]`` (marked ``cluster``: ``-m cluster`` runs
    only those, ``-m "not cluster"`` none). A test marked ``single_backend(reason)`` runs on the single server only,
    one marked ``cluster_backend`` (a cluster defect's regression test) on the cluster only."""
    if "backend" not in metafunc.fixturenames or not metafunc.definition.get_closest_marker("both_backends"):
        return
    single_only = metafunc.definition.get_closest_marker("single_backend")
    if single_only and not (single_only.args and single_only.args[0].strip()):
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: single_backend needs its reason")
    cluster_only = metafunc.definition.get_closest_marker("cluster_backend")
    metafunc.parametrize("backend", BACKENDS[:1] if single_only else BACKENDS[1:] if cluster_only else BACKENDS,
                         indirect=True)


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.cluster_subset(*ids, reason=...)`` on a parametrised both_backends test: on the cluster only the
    parametrisations with those ids run (``[cluster-<id>]``; the others are deselected), where the parameter varies
    something the cluster does not touch (how a platform delivers signals) and CI time matters (docs/testing.md)."""
    keep, drop = [], []
    for item in items:
        mark, spec = item.get_closest_marker("cluster_subset"), getattr(item, "callspec", None)
        if mark and spec and spec.params.get("backend") == "cluster":
            if not mark.kwargs.get("reason"):
                raise pytest.UsageError(f"{item.nodeid}: cluster_subset needs its reason")
            if spec.id not in {f"cluster-{i}" for i in mark.args}:
                drop.append(item)
                continue
        keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def backend(request):
    """The test's :class:`Backend`: the single redis-server unless the test is parametrised (``both_backends``)."""
    kind = getattr(request, "param", "single")
    return Backend(kind, request.getfixturevalue("redis_cluster" if kind == "cluster" else "redis_server"))


@pytest.fixture
def r(backend):
    """A client on a flushed database (decode_responses=True): on the cluster, the runtime's SlotClient around
    redis-py's RedisCluster (every primary flushed), so keys go to their slot's node and ``r.node()`` (support.home)
    is the node that holds the key space."""
    backend.flush()
    client = backend.shared_client()
    yield client
    if not backend.cluster:
        client.close()


@pytest.fixture
def k(backend):
    """The key schema (worker/keys.py ``Keys``) of the test's backend: ``k.queue("default")`` is
    ``worker:queue:default`` on a single server and ``{worker}:queue:default`` on the cluster."""
    return backend.keys


@pytest.fixture
def env(backend):
    """Environment for worker subprocesses: the test Redis, the test jobs, fast heartbeats."""
    e = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    e.update({**backend.env, "JOB_MODULES": "worker.sample,tests.jobs", "PYTHONUNBUFFERED": "1",
              "PYTHONPATH": str(REPO), "LOG_LEVEL": "DEBUG"})
    return e


class Proc:
    """A spawned process whose stdout+stderr lines are collected as they come."""

    def __init__(self, args, env, cwd=REPO, new_session=True):
        self.popen = subprocess.Popen(args, env=env, cwd=str(cwd), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, bufsize=1,
                                      start_new_session=new_session)
        self.pid = self.popen.pid
        self.lines = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_for(self, pattern: str, timeout: float = 15.0) -> str:
        """Block until a line matches ``pattern`` (regex); returns the line. Fails the test on timeout."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for _, line in self.lines[seen:]:
                    if rx.search(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no line matching {pattern!r} within {timeout}s; output:\n{self.output}")
                self._cond.wait(left)

    def signal(self, signum):
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 15.0) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"process {self.pid} still running after {timeout}s; output:\n{self.output}")

    def kill_tree(self):
        for pid in [self.pid] + descendants(self.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._reader.join(2)


@pytest.fixture
def spawn(env):
    """``spawn(*cli_args, **env_overrides)`` starts ``python -m worker ...``; killed (whole tree) at teardown.
    Pass ``argv=[...]`` to run another command line instead (same env, cwd = repo root)."""
    procs = []

    def _spawn(*args, argv=None, new_session=True, **overrides):
        e = dict(env)
        e.update({k: str(v) for k, v in overrides.items()})
        p = Proc(argv or [PYTHON, "-m", "worker", *args], e, new_session=new_session)
        procs.append(p)
        return p

    yield _spawn
    for p in procs:
        p.kill_tree()


def run_cli(env, *args, timeout=30, **overrides):
    """Run ``python -m worker ARGS`` to completion; returns CompletedProcess (text)."""
    e = dict(env)
    e.update({k: str(v) for k, v in overrides.items()})
    return subprocess.run([PYTHON, "-m", "worker", *args], env=e, cwd=str(REPO), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def module_broker(backend):
    """``module_broker(modules)``: the runtime's module-level broker (what ``enqueue``, ``get_job``, ``cancel`` use)
    pointed at the test server, with ``JOB_MODULES=modules``; reset and closed at teardown."""
    from worker import jobs
    from worker.client import connect
    from worker.fetch import Broker
    made = []

    def _use(modules: str):
        cfg = backend.config(JOB_MODULES=modules)
        broker = Broker(connect(cfg, name="enqueue"), cfg)
        jobs.use(broker)
        made.append(broker)
        return broker

    yield _use
    jobs.use(None)
    for broker in made:
        broker.r.close()


@pytest.fixture
def enqueue(r, backend):
    """``enqueue(name, *args, **kwargs)`` pushes a job with the runtime's own producer (``Broker.push``) and returns
    its id; the job need not be registered in the test process."""
    from worker.fetch import Broker
    broker = Broker(r, backend.config())
    return lambda name, *args, **kwargs: broker.push(name, args, kwargs)


@pytest.fixture
def cli(env):
    return lambda *args, **kw: run_cli(env, *args, **kw)


@pytest.fixture
def redis_cluster_ha(tmp_path_factory):
    """A 3-primary cluster with one replica each (6 processes), for one failover test (issue 26 point 3)."""
    why = LocalCluster.why_not()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"no local Redis Cluster in CI: {why}")
        pytest.skip(f"no local Redis Cluster: {why}")
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster-ha"), replicas=1)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
