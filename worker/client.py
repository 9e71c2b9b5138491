"""Redis connections built from the config: TLS for ``rediss://``, bounded timeouts, redis-py's own retry/backoff.

A worker process holds one connection (single-threaded parent; children never touch Redis), plus a short-lived one
only while it writes its last bookkeeping during shutdown. Heroku's small Redis plans cap connections, so nothing
here opens a connection per job.
"""
from __future__ import annotations

import select
from typing import Optional

import redis
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry

from .config import Config


def connect(cfg: Config, *, timeout: Optional[float] = None, retries: int = 3, name: str = "worker") -> redis.Redis:
    """A client for ``cfg.redis_url``.

    ``rediss://`` URLs use TLS without certificate verification unless ``REDIS_TLS_VERIFY`` is true: Heroku Key-Value
    Store presents self-signed certificates. Every socket operation is bounded by ``timeout`` (default
    ``REDIS_TIMEOUT``) so no call can hold a shutdown back forever; transient errors are retried by redis-py with
    exponential backoff and jitter, ``retries`` times. ``READONLY`` replies (a failover demoted the node) drop
    the connection and retry the same way, even with ``retries=0`` the next call reconnects.
    """
    t = cfg.redis_timeout if timeout is None else max(0.01, timeout)
    kwargs = dict(
        socket_timeout=t,
        socket_connect_timeout=t,
        health_check_interval=30,
        client_name=name,
        decode_responses=True,
        # Queues may hold bytes that are not UTF-8 (anyone can RPUSH). surrogateescape round-trips them exactly,
        # so such an entry is claimed, recorded as a bad payload and removed by value like any other.
        encoding_errors="surrogateescape",
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries) if retries else Retry(NoBackoff(), 0),
        # ReadOnlyError: after a failover the node we are connected to became a replica (Heroku's failover moves
        # the DNS name to the new primary). Retrying on it makes redis-py drop the connection, so the retry, and
        # every later call, reconnects and resolves the name again; on the old connection every write would fail
        # for good. A replica refuses a write before doing anything, so the retry cannot apply it twice.
        retry_on_error=[redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError],
    )
    if not cfg.redis_url.startswith("unix://"):
        kwargs["socket_keepalive"] = True  # TCP only: redis-py's Unix socket connection refuses the option
    if cfg.redis_url.startswith("rediss://") and not cfg.redis_tls_verify:
        kwargs["ssl_cert_reqs"] = None
        kwargs["ssl_check_hostname"] = False
    return redis.Redis.from_url(cfg.redis_url, **kwargs)


def outage_backoff() -> ExponentialWithJitterBackoff:
    """The policy the supervisor waits by between attempts while Redis is unreachable (redis-py's backoff)."""
    return ExponentialWithJitterBackoff(base=0.2, cap=5.0)


def blocking_pop(r: redis.Redis, keys, timeout: float, wake_fd: int) -> Optional[tuple]:
    """``BLPOP keys timeout`` that returns ``None`` early when ``wake_fd`` becomes readable (a signal arrived).

    redis-py retries interrupted reads (PEP 475) and signal handlers here only record, so a plain BLPOP would hold
    an idle worker's exit back for up to ``timeout``. Instead the command is sent and both the socket and the
    signal wake-up pipe are watched; if a signal wins, the connection is dropped (the server discards the blocked
    BLPOP with it) and the next command reconnects.
    """
    pool = r.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_command("BLPOP", *keys, timeout)
        sock = getattr(conn, "_sock", None)
        if sock is None:  # unknown redis-py internals: fall back to an uninterruptible read
            return conn.read_response()
        ready, _, _ = select.select([sock, wake_fd], [], [], timeout + max(1.0, conn.socket_timeout or 1.0))
        if sock in ready:
            return conn.read_response()
        conn.disconnect()
        return None
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)
