"""Redis Cluster (issue 26): the runtime on a real local cluster of 3 primaries (tests/support.py LocalCluster).

The cluster is one per session (``redis_cluster`` in conftest.py); each test flushes every primary first.
"""
from __future__ import annotations

import redis


def test_local_cluster_is_up(redis_cluster):
    """Issue 26 point 4: three primaries sharing the 16384 slots, every node in cluster_state:ok."""
    c = redis.RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    try:
        primaries = c.get_primaries()
        assert len(primaries) == 3
        assert c.cluster_info()["cluster_state"] == "ok"
        c.set("{a}x", 1)
        assert c.get("{a}x") == "1"
    finally:
        c.close()
