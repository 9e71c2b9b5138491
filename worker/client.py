"""Redis connections built from the config: TLS for ``rediss://``, bounded timeouts, redis-py's own retry/backoff.

A worker process holds two connections whatever WORKER_CONCURRENCY is: its commands (through a :class:`Link`) and
its idle BLPOP (a :class:`Waiter`); children never touch Redis. A short-lived third replaces the first only for the
last bookkeeping of a shutdown. Heroku's small Redis plans cap connections, so nothing here opens one per job.
"""
from __future__ import annotations

import select
import time
from typing import Callable, Optional

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
    retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries) if retries else Retry(NoBackoff(), 0)
    return redis.Redis.from_url(cfg.redis_url, **_options(cfg, timeout, name, retry))


def connect_async(cfg: Config, *, name: str = "enqueue-async", retries: int = 3):
    """A ``redis.asyncio`` client for ``cfg.redis_url`` with :func:`connect`'s settings (TLS, timeouts, retries on
    the same errors with the same backoff): for producers in async web apps (``worker.aio_api``)."""
    import redis.asyncio
    from redis.asyncio.retry import Retry as AsyncRetry
    retry = AsyncRetry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries) if retries else \
        AsyncRetry(NoBackoff(), 0)
    return redis.asyncio.Redis.from_url(cfg.redis_url, **_options(cfg, None, name, retry))


def _options(cfg: Config, timeout: Optional[float], name: str, retry) -> dict:
    """The client settings :func:`connect` documents, for either kind of client."""
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
        retry=retry,
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
    return kwargs


def outage_backoff() -> ExponentialWithJitterBackoff:
    """The policy the supervisor waits by between attempts while Redis is unreachable (redis-py's backoff)."""
    return ExponentialWithJitterBackoff(base=0.2, cap=5.0)


class Link:
    """The supervisor's command connection, driven from its loop.

    A call sends its command, then waits for the reply in ``select`` together with the signal wake-up pipe; whenever
    a signal arrives or ``due()`` seconds pass, ``service()`` runs (it signals job children and touches no Redis), so
    a slow or hung Redis never delays a stop or a deadline. The whole call is bounded by the connection's socket
    timeout; on any error but an error reply the connection is dropped (the next call reconnects) and the error
    propagates.
    """

    def __init__(self, r: redis.Redis, wake_fd: int, service: Callable[[], None], due: Callable[[], float]):
        self.r, self.wake_fd, self.service, self.due = r, wake_fd, service, due

    def execute(self, *args):
        pool = self.r.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_command(*args)
            self._wait(conn)
            return conn.read_response()
        except redis.exceptions.ResponseError as exc:
            # an error reply was read whole: the connection is in step. Kept for NOSCRIPT (every script's first
            # use) and a script's own error; dropped for the rest (READONLY after a failover: reconnect)
            if type(exc) not in (redis.exceptions.ResponseError, redis.exceptions.NoScriptError):
                conn.disconnect()
            raise
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def script(self, script, keys, args):
        """Run a registered redis-py ``Script`` by its SHA, loading it on first use (``NOSCRIPT``)."""
        try:
            return self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return self.execute("EVAL", script.script, len(keys), *keys, *args)

    def _wait(self, conn) -> None:
        sock = getattr(conn, "_sock", None)
        if sock is None:  # unknown redis-py internals: read_response blocks, bounded by the socket timeout
            return
        deadline = time.monotonic() + (conn.socket_timeout or 5.0)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise redis.TimeoutError("Timeout reading from socket")
            try:
                ready, _, _ = select.select([sock, self.wake_fd], [], [], max(0.0, min(left, self.due())))
            except InterruptedError:
                ready = []
            if sock in ready:
                return
            self.service()


class Waiter:
    """The idle wait: ``BLPOP`` on the wake lists, sent on a connection of its own and left pending while the loop
    does other work (jobs finishing, heartbeats); the loop selects on :meth:`fileno`. Cancelling drops the
    connection (the server forgets the blocked BLPOP with it); that only happens when the worker stops."""

    def __init__(self, r: redis.Redis):
        self.r = r
        self.conn = None
        self.since = 0.0
        self.timeout = 0.0

    @property
    def armed(self) -> bool:
        return self.conn is not None

    def arm(self, keys, timeout: float) -> None:
        if self.conn is not None:
            return
        conn = self.r.connection_pool.get_connection()
        try:
            conn.send_command("BLPOP", *keys, round(max(0.01, timeout), 3))
        except BaseException:
            conn.disconnect()
            self.r.connection_pool.release(conn)
            raise
        self.conn, self.since, self.timeout = conn, time.monotonic(), timeout

    def fileno(self) -> int:
        sock = getattr(self.conn, "_sock", None)
        return sock.fileno() if sock is not None else -1

    def result(self):
        """The BLPOP's answer, ``(key, value)`` or None; the connection goes back to the pool."""
        conn, self.conn = self.conn, None
        try:
            return conn.read_response()
        except redis.exceptions.ResponseError as exc:
            # an error reply was read whole: the connection is in step. Kept for NOSCRIPT (every script's first
            # use) and a script's own error; dropped for the rest (READONLY after a failover: reconnect)
            if type(exc) not in (redis.exceptions.ResponseError, redis.exceptions.NoScriptError):
                conn.disconnect()
            raise
        except BaseException:
            conn.disconnect()
            raise
        finally:
            self.r.connection_pool.release(conn)

    def cancel(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            conn.disconnect()
            self.r.connection_pool.release(conn)

    def close(self) -> None:
        self.cancel()
        self.r.close()
