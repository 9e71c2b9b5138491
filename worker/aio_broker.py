"""The producers' broker on redis-py's asyncio client (``redis.asyncio``), for async web apps (FastAPI,
Starlette, aiohttp): behind ``await f.enqueue_async(...)`` (``worker.jobs``) and ``await get_job_async(id)``
(``worker.results``).

It only awaits what the sync :class:`~worker.fetch.Broker` builds: :meth:`~worker.fetch.Broker.push_call` makes
the checked payload and the ENQUEUE call (``worker.lua.calls``), so routing, checks, payload and script are the
sync producer's. The connection comes from the environment (``REDIS_URL`` and the other ``REDIS_*`` settings,
``client.connect_async``) on first use, one client per event loop: an asyncio connection belongs to the loop it was
made in. ``await close()`` closes the running loop's client (e.g. in the app's shutdown hook).
"""
from __future__ import annotations

import asyncio
import weakref
from typing import Optional

from .fetch import Broker
from .lua import Registry
from .lua.calls import enqueued_id

_brokers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # event loop -> AsyncBroker


class AsyncBroker:
    """An asyncio client, the scripts registered on it, and a client-less :class:`Broker` that builds the calls."""

    def __init__(self, client, cfg):
        self.r = client
        self.cfg = cfg
        self.calls = Broker(None, cfg)  # builds payloads and calls only: it never touches its (absent) client
        self.keys = self.calls.keys
        self.scripts = Registry(client)  # redis-py's AsyncScript: run() returns an awaitable

    async def push(self, name: str, args, kwargs, queue: Optional[str] = None, due: Optional[float] = None,
                   delay: Optional[float] = None, job_id: Optional[str] = None, options: Optional[dict] = None) -> str:
        """:meth:`Broker.push` on this client: one round trip, the same call (``job_id``: deduplicated as there)."""
        job_id, call = self.calls.push_call(name, args, kwargs, queue, due, delay, job_id, options)
        return enqueued_id(job_id, await self.scripts.run(call))

    async def read_job(self, job_id: str) -> tuple:
        """``(status record, failed record JSON, held)`` as ``results.fetch`` reads them; ``held``: the worker
        names and their hashes, read only while the record says queued or scheduled (a running job is found in
        its worker's slots), else None. QUEUE_GROUPS: the group where the id still waits (queued or scheduled),
        else the first group (in their order) that knows it (as ``Broker.find``)."""
        found = None
        for space in self.calls.spaces():
            keys = space.keys
            async with self.r.pipeline(transaction=False) as p:
                p.hgetall(keys.job(job_id))
                p.hget(keys.failed_data, job_id)
                info, failure = await p.execute()
            if info.get("status") in ("queued", "scheduled"):
                found = None
                break
            if (info or failure) and found is None:
                found = (keys, info, failure)
        if found is not None:
            keys, info, failure = found
        if not info or info.get("status") not in ("queued", "scheduled"):
            return info, failure, None
        workers = await self.r.zrange(keys.workers, 0, -1)
        if not workers:
            return info, failure, None
        async with self.r.pipeline(transaction=False) as p:
            for w in workers:
                p.hgetall(keys.worker(w))
            return info, failure, (workers, await p.execute())


def default() -> AsyncBroker:
    """The running event loop's broker, connected from the environment on first use."""
    loop = asyncio.get_running_loop()
    b = _brokers.get(loop)
    if b is None:
        from . import config
        from .client import connect_async
        cfg = config.load(export=False)  # a web process's os.environ is not ours to change (as the sync API)
        b = _brokers[loop] = AsyncBroker(connect_async(cfg), cfg)
    return b


async def close() -> None:
    """Close the running event loop's client (the next call opens a new one)."""
    b = _brokers.pop(asyncio.get_running_loop(), None)
    if b is not None:
        await (b.r.aclose() if hasattr(b.r, "aclose") else b.r.close())
