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
    if cfg.redis_cluster:
        return _cluster(cfg, _options(cfg, timeout, name, retry))
    return redis.Redis.from_url(cfg.redis_url, **_options(cfg, timeout, name, retry))


def connect_async(cfg: Config, *, name: str = "enqueue-async", retries: int = 3):
    """A ``redis.asyncio`` client for ``cfg.redis_url`` with :func:`connect`'s settings (TLS, timeouts, retries on
    the same errors with the same backoff): for producers in async web apps (``worker.aio_api``)."""
    import redis.asyncio
    from redis.asyncio.retry import Retry as AsyncRetry
    retry = AsyncRetry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries) if retries else \
        AsyncRetry(NoBackoff(), 0)
    if cfg.redis_cluster:  # (untested on a cluster: issue 26 covered the synchronous clients)
        from redis.asyncio.cluster import RedisCluster as AsyncCluster
        return AsyncCluster.from_url(cfg.redis_url, **_cluster_options(_options(cfg, None, name, retry)))
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


def connect_node(cfg: Config, node: redis.Redis, *, timeout: float, name: str) -> redis.Redis:
    """A plain client of the cluster node ``node`` (a :class:`SlotClient`'s ``node()``) with :func:`connect`'s
    settings and no retries: for a few calls on the key space's slot that must end in time (the exit's last
    bookkeeping). A new RedisCluster would first read the slot map and redis-py's COMMAND table (~0.1 s of parsing,
    0.3 s under load: the worker's exit came late by that). If the slot has moved since, the node answers MOVED: an
    error like any other there (what the exit cannot write is recovered later)."""
    from urllib.parse import urlsplit, urlunsplit
    kw = node.connection_pool.connection_kwargs
    parts = urlsplit(cfg.redis_url)
    auth = parts.netloc.rpartition("@")[0]
    host = f"[{kw['host']}]" if ":" in str(kw["host"]) else kw["host"]
    url = urlunsplit((parts.scheme, f"{auth}@{host}:{kw['port']}" if auth else f"{host}:{kw['port']}", "/0",
                      parts.query, ""))
    return redis.Redis.from_url(url, **_options(cfg, timeout, name, Retry(NoBackoff(), 0)))


def _cluster(cfg: Config, kwargs: dict) -> "SlotClient":
    from redis.cluster import RedisCluster
    return SlotClient(RedisCluster.from_url(cfg.redis_url, **_cluster_options(kwargs)), cfg.key_prefix)


def _cluster_options(kwargs: dict) -> dict:
    kwargs.pop("health_check_interval", None)
    kwargs.pop("retry_on_error", None)  # the cluster client retries connection errors and MOVED/ASK itself
    return kwargs


class SlotClient:
    """``REDIS_CLUSTER``: redis-py's cluster client for a key space that lives in one hash slot (``{prefix}``).

    Commands and scripts go through ``RedisCluster``, which routes them by key, follows MOVED and ASK (sending
    ASKING before a script during a slot migration) and re-reads the slot map after a failover. Pipelines (MULTI
    transactions, TIME, scripts inside them), SCAN, TIME and INFO go to the plain client of the node that holds the
    slot: all their keys, and the clock the scripts read, are there. A MOVED/ASK/TRYAGAIN/CLUSTERDOWN reply to one re-reads the slot map and is raised as a
    ``ConnectionError``, which every caller already retries (a MULTI refused by MOVED applied nothing)."""

    def __init__(self, cluster, prefix: str):
        self.cluster, self.prefix = cluster, prefix

    def __getattr__(self, name):
        return getattr(self.cluster, name)

    def node(self):
        """The plain client of the node that holds the key space's slot now (redis-py's cached slot map)."""
        return self.cluster.get_node_from_key(self.prefix).redis_connection

    def pipeline(self, transaction: bool = True, shard_hint=None):
        return _SlotPipeline(self, self.node().pipeline(transaction=transaction))

    def scan(self, *args, **kwargs):
        return self.redirected(lambda: self.node().scan(*args, **kwargs))

    def time(self):
        """The clock of the node the scripts run on (RedisCluster would ask any node)."""
        return self.redirected(lambda: self.node().time())

    def info(self, *args, **kwargs):
        """That node's INFO (RedisCluster would merge every node's)."""
        return self.redirected(lambda: self.node().info(*args, **kwargs))

    def redirected(self, fn):
        node = self.node()
        try:
            return fn()
        except redis.ResponseError as e:
            # a MULTI whose commands were refused with MOVED/ASK ends in EXECABORT; anything else is not ours
            if not is_redirect(e) and not (isinstance(e, redis.exceptions.ExecAbortError) and self._moved(node)):
                raise
            self.cluster.nodes_manager.initialize()
            raise redis.ConnectionError(f"cluster slot moved: {e}") from e

    def _moved(self, node) -> bool:
        """Whether the slot map, re-read, puts the key space on another node than ``node``."""
        self.cluster.nodes_manager.initialize()
        return self.node() is not node

    def close(self) -> None:
        self.cluster.close()


class _SlotPipeline:
    """A node's pipeline whose ``execute`` turns a redirection into a retryable error (see :class:`SlotClient`)."""

    def __init__(self, owner: SlotClient, pipe):
        self._owner, self.pipe = owner, pipe  # .pipe: lua.Registry queues scripts on it (redis-py loads them)

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.pipe.reset()

    def execute(self, raise_on_error: bool = True):
        out = self._owner.redirected(lambda: self.pipe.execute(raise_on_error=raise_on_error))
        for item in out:
            if isinstance(item, redis.ResponseError) and is_redirect(item):
                self._owner.cluster.nodes_manager.initialize()
                raise redis.ConnectionError(f"cluster slot moved: {item}")
        return out


_REDIRECTS = (redis.exceptions.AskError, redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError)


def is_redirect(err: Exception) -> bool:
    """MOVED (redis-py's MovedError is an AskError), ASK, TRYAGAIN or CLUSTERDOWN, parsed or as plain text."""
    return isinstance(err, _REDIRECTS) or str(err).startswith(("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"))


def is_cluster(r) -> bool:
    return isinstance(r, SlotClient)


def for_space(r, prefix: str):
    """A client for key space ``prefix`` (a queue group's, ``Config.group_prefix``): ``r`` itself, or on a cluster a
    :class:`SlotClient` for that prefix's slot on ``r``'s cluster client (its connections and slot map shared)."""
    if isinstance(r, SlotClient) and r.prefix != prefix:
        return SlotClient(r.cluster, prefix)
    return r


def node_client(r, key: str):
    """The plain client of the node that holds ``key``'s slot (``r`` itself when not a cluster)."""
    return r.cluster.get_node_from_key(key).redis_connection if is_cluster(r) else r


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
        cluster = is_cluster(self.r)  # on a cluster: the node that holds the key space's slot (SlotClient)
        pool = self.r.node().connection_pool if cluster else self.r.connection_pool
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
            if not (cluster and is_redirect(exc)):
                raise
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        # the slot moved or is moving, so the node refused the command (nothing ran): redis-py's cluster client sends
        # it where it belongs (ASKING first during a migration; TRYAGAIN retried) and re-reads the slot map
        return self.r.execute_command(*args)

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
        self.pool = None
        self.since = 0.0
        self.timeout = 0.0

    @property
    def armed(self) -> bool:
        return self.conn is not None

    def arm(self, keys, timeout: float) -> None:
        if self.conn is not None:
            return
        # on a cluster the wake lists (one hash tag) live on one node: the BLPOP goes to its pool
        pool = node_client(self.r, keys[0]).connection_pool
        conn = pool.get_connection()
        try:
            conn.send_command("BLPOP", *keys, round(max(0.01, timeout), 3))
        except BaseException:
            conn.disconnect()
            pool.release(conn)
            raise
        self.conn, self.pool, self.since, self.timeout = conn, pool, time.monotonic(), timeout

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
            if is_cluster(self.r) and is_redirect(exc):
                # the slot moved (or is moving) while we waited: re-read the slot map; the loop claims anyway
                self.r.nodes_manager.initialize()
                return None
            raise
        except BaseException:
            conn.disconnect()
            raise
        finally:
            self.pool.release(conn)

    def cancel(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            conn.disconnect()
            self.pool.release(conn)

    def close(self) -> None:
        self.cancel()
        self.r.close()
