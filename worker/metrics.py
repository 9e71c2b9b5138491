"""Queue depth and latency for autoscalers and dashboards, and Heroku log metrics (l2met ``sample#`` lines).

:func:`queue_depth` and :func:`queue_latency` read every queue in one round trip (one read-only Lua script), with
latency on the Redis clock exactly as ``python -m worker status`` computes it: the age of the head (oldest) job's
``enqueued_at`` (for scheduled jobs and retries: when they became due), 0.0 for an empty queue, ``None`` when the
head cannot be read. ``queues=None`` means every queue Redis knows (``P:queues``) plus the configured ``QUEUES``.

:class:`Sampler` is what the worker runs: every ``METRICS_INTERVAL`` seconds (default 60; 0 = off) exactly one of
the running workers logs one line::

    level=info event=metrics sample#queue.default.depth=3 sample#queue.default.latency=12.500s ... worker=worker.1:4

There is no leader: each interval (``floor(redis_time / interval)``) has a key ``P:metrics:<index>`` that the first
worker to look in that interval sets (``SET NX``, expiring after two intervals); only that worker logs. Every
worker looks once per interval, so some worker logs in every interval as long as one runs.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import redis

from .api_values import latency as head_latency
from .lua import Registry, calls


def _parse(res) -> tuple:
    """``(won, redis_now, {queue: (depth, latency)})`` from a STATS reply (``worker/lua/stats.lua``)."""
    won, now, rows = calls.parse_stats(res)
    return won, now, {q: (depth, head_latency(head, now)) for q, depth, head in rows}


def _names(queues, cfg) -> tuple:
    """``(all_known, names)``: ``queues=None`` is every known queue plus the configured ones."""
    if queues is None:
        return True, [q for q in cfg.queues if q != "*"]
    if isinstance(queues, str):
        queues = [queues]
    return False, list(queues)


def queue_stats(queues: Optional[Iterable[str]] = None, *, broker=None) -> Dict[str, tuple]:
    """``{queue: (depth, latency_seconds)}`` in one round trip (see the module docstring). ``broker``: a
    ``worker.fetch.Broker`` (default: the one the enqueue API uses, from ``REDIS_URL``)."""
    from . import jobs
    b = broker or jobs.default_broker()
    all_known, names = _names(queues, getattr(b, "cfg", None) or _no_cfg())
    if getattr(b, "inline", False):  # worker.testing.inline(): jobs run at enqueue, nothing ever waits
        return {q: (0, 0.0) for q in sorted(set(names))}
    if not getattr(b.cfg, "queue_groups", ()):
        return _parse(Registry(b.r).run(calls.stats(b.keys, 0, "", all_known, names)))[2]
    out = {}  # QUEUE_GROUPS: each group's queues in its key space (a queue in no group raises ValueError)
    for q in names:
        b.cfg.group_of(q)
    for s in b.spaces():
        mine = [q for q in names if q in s.cfg.queues]
        if mine or all_known:
            out.update(_parse(Registry(s.r).run(calls.stats(s.keys, 0, "", all_known, mine)))[2])
    return out


def queue_depth(queues: Optional[Iterable[str]] = None, *, broker=None) -> Dict[str, int]:
    """``{queue: number of waiting jobs}`` for ``queues`` (default: every queue), in one round trip."""
    return {q: d for q, (d, _) in queue_stats(queues, broker=broker).items()}


def queue_latency(queues: Optional[Iterable[str]] = None, *, broker=None) -> Dict[str, Optional[float]]:
    """``{queue: seconds the oldest waiting job has waited}`` (Redis clock; 0.0 when empty, ``None`` when its head
    is unreadable), for ``queues`` (default: every queue), in one round trip."""
    return {q: lat for q, (_, lat) in queue_stats(queues, broker=broker).items()}


def _no_cfg():
    from .config import Config
    return Config()


class Sampler:
    """The worker's side: ``maybe_sample`` from the supervisor's loop logs the l2met line when this worker wins the
    interval. Costs one comparison when not due, one script call when due (once per interval per worker)."""

    def __init__(self, cfg, worker: str):
        self.cfg = cfg
        self.worker = worker
        self.interval = float(cfg.metrics_interval)
        self._next = float("-inf") if self.interval > 0 else float("inf")  # -inf: look on the first turn

    def maybe_sample(self, broker, log, now_monotonic: float, worker: Optional[str] = None) -> bool:
        """Log ``sample#queue.<q>.depth=N sample#queue.<q>.latency=Xs`` for every queue if due and this worker
        wins the interval; returns True when it logged. A Redis error is logged at debug level and waits for the
        next interval (the worker's own Redis handling deals with outages)."""
        if now_monotonic < self._next:
            return False
        # one interval after the previous look was due, not after now: late loop turns do not drift
        after = self._next + self.interval
        self._next = after if after > now_monotonic else now_monotonic + self.interval
        all_known, names = _names(None, self.cfg)
        try:
            res = broker.run(calls.stats(broker.keys, int(self.interval * 1000), worker or self.worker, all_known,
                                           names))
        except redis.RedisError as exc:
            log.debug("metrics.skipped", error=f"{type(exc).__name__}: {exc}")
            return False
        won, _, stats = _parse(res)
        if not won:
            return False
        fields = {}
        for q, (depth, latency) in stats.items():
            fields[f"sample#queue.{q}.depth"] = depth
            fields[f"sample#queue.{q}.latency"] = None if latency is None else f"{latency:.3f}s"
        log.info("metrics", **fields)
        return True


__all__ = ["queue_depth", "queue_latency", "queue_stats", "Sampler"]
