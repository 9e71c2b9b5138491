"""Benchmarks (docs/performance.md). Shared set-up for the ones that need a Redis of their own."""
from __future__ import annotations

import contextlib
import tempfile


@contextlib.contextmanager
def scratch_redis():
    """A redis-server of its own on a free loopback port, for one benchmark run: yields ``(url, client)``."""
    import redis
    from tests.support import free_port, start_redis_server
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = start_redis_server(port, tmp)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            yield url, redis.Redis.from_url(url, decode_responses=True)
        finally:
            server.terminate()
            server.wait(10)


def use_module_broker(url: str, **env):
    """Point the runtime's module-level broker (``enqueue``, ``cancel``, ``get_job``) at ``url``."""
    from worker import config, jobs
    from worker.client import connect
    from worker.fetch import Broker
    cfg = config.from_mapping({"REDIS_URL": url, **env})
    broker = Broker(connect(cfg, name="bench"), cfg)
    jobs.use(broker)
    return broker
