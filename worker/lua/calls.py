"""Every script's argument layout and reply, in one place: a function per script builds its :class:`Call` (KEYS and
ARGV in the order its ``.lua`` header declares), and ``parse_*`` reads its reply. Callers (``fetch``, ``failed``,
``metrics``, ``schedule``, ``api``, ``status``, ``web.actions``) run a Call with :meth:`worker.lua.Registry.run`
(or ``Broker._call``) and never index KEYS or ARGV themselves.

Imports nothing of the runtime but ``keys`` (a ``Keys`` is passed in), so any layer may use it.
"""
from __future__ import annotations

from typing import NamedTuple, Optional


class Call(NamedTuple):
    script: str   # worker/lua/<script>.lua
    keys: list
    args: list


# --- enqueue, the worker's hot path ---

def enqueue(k, queue: str, dedupe_id: str, dedupe_ms: int, when: str, jobs: list, unique="") -> Call:
    """ENQUEUE of ``jobs`` = ``[(job_id, name, payload), ...]`` (one name per call) onto ``queue``; ``unique``:
    ``"1"`` (or True) one job whose id is the producer's own (nothing enqueued while a job of that id has not
    ended); ``"s"`` one job of ``unique_until="start"`` (nothing enqueued while a job of its key waits to start:
    the reply is that job's id, :func:`enqueued_id`)."""
    mode = "1" if unique is True else (unique or "")
    return Call("enqueue", [k.prefix, k.queue(queue), k.queues, k.scheduled, k.enqueued(dedupe_id)],
                [queue, dedupe_ms, when, jobs[0][1], mode, len(jobs), *[j[0] for j in jobs],
                 *[j[2] for j in jobs]])


def enqueued_id(job_id: str, reply) -> str:
    """The id an ENQUEUE of ``job_id`` stands for: the reply when it names one (unique ``"s"``: the job that holds
    the key, perhaps another), else ``job_id``."""
    if isinstance(reply, bytes):
        reply = reply.decode()
    return reply if isinstance(reply, str) and reply else job_id


def outcome(o, result_ttl_ms: int, failed_ttl_ms: int) -> tuple:
    """The eight CYCLE fields of a ``fetch.Outcome`` (cycle.lua: op, slot, payload, job id, a, b, c, started)."""
    op = o.op.value
    if op == "ack" or op == "cancel":
        a, b, c = o.result, (o.keep_ms if o.keep_ms is not None else result_ttl_ms), o.warning
    elif op == "fail":
        a, b, c = o.record, failed_ttl_ms, o.attempts
    elif op == "retry":
        a, b, c = o.new_payload, o.delay_ms, o.attempts
    else:  # requeue
        a, b, c = o.queue, o.new_payload, o.attempts or ""
    return op, o.slot, o.payload, o.job_id, a, b, c, o.started_ms or ""


def limits(meta: dict) -> list:
    """CYCLE's limits section from ``jobs.meta()``: ``[nlim, name, concurrency, rate count, rate period ms, ...]``
    for the jobs declared with ``@job(concurrency=)`` or ``@job(rate=)`` (``[0]`` when none: issue 25)."""
    out = [0]
    for name, m in sorted(meta.items()):
        conc, rate = m.get("concurrency"), m.get("rate")
        if conc or rate:
            out += [name, conc or "", *(rate or ("", ""))]
            out[0] += 1
    return out


def cycle(k, worker: str, *, beat_ttl_ms, failed_max: int, failed_ttl_ms: int, wildcard: bool, mode: str,
          busy: int, tidy: bool, epoch: str, queues: list, checkpoints, outcomes: list, claim,
          limits=(0,)) -> Call:
    """CYCLE: ``outcomes`` are :func:`outcome` tuples; ``beat_ttl_ms`` '' = no beat this call; ``limits``: what
    :func:`limits` built."""
    args = [worker, beat_ttl_ms, failed_max, failed_ttl_ms, "1" if wildcard else "0", mode, busy,
            "1" if tidy else "0", epoch, len(queues), *queues, *limits, len(checkpoints)]
    for slot, value in checkpoints:
        args += [slot, value]
    args.append(len(outcomes))
    for fields in outcomes:
        args.extend(fields)
    args.extend(claim)
    return Call("cycle", [k.prefix, k.processing(worker), k.workers, k.worker(worker), k.scheduled, k.paused,
                          k.queues, k.epoch, k.recovered(worker)], args)


class Claim(NamedTuple):
    slot: int
    payload: str
    queue: str
    at: int = 0  # when it was claimed (ms, Redis clock): the job's started_at, handed back with its outcome


class Cycle(NamedTuple):
    """What a CYCLE call found: the claims made (one per slot at most), the milliseconds until the next scheduled
    job is due on Redis's clock (when nothing was claimed), the queue names considered (when nothing was claimed),
    and how many jobs the processing list holds afterwards."""

    claims: list
    next_due: Optional[float]
    queues: list
    held: int
    lost: bool = False  # Redis lost its data since we registered (P:epoch): nothing was recorded; see Broker.restore
    recovered: int = 0  # beats only: 1 another worker took us for dead and recovered our jobs (P:recovered:<w>);
    #                     2 our registration was gone all the same (P:workers)
    refused: Optional[tuple] = None  # (key, type): a key this call had to write is of the wrong type; nothing was
    #                                  written (cycle.lua), the claims stay in the processing list
    odd: tuple = ()     # keys found wrong-typed and skipped (bookkeeping only: the call's outcomes took effect)
    cancel: tuple = ()  # beats only: ids of jobs cancel(running=True) asked this worker to stop (P:cancel:<w>)


def parse_cycle(res) -> Cycle:
    if int(res[0]) == -2:
        return Cycle([], None, [], -1, lost=True)
    if int(res[0]) == -3:
        return Cycle([], None, [], -1, refused=(res[1], res[2]))
    now, n = int(res[2]), int(res[3])
    claims = [Claim(int(res[7 + 3 * i]), res[8 + 3 * i], res[9 + 3 * i], now) for i in range(n)]
    return Cycle(claims, float(res[1]) if res[1] else None, list(res[7 + 3 * n:]), int(res[0]),
                 recovered=int(res[4]), odd=tuple(res[5].split("\n")) if res[5] else (),
                 cancel=tuple(res[6].split("\n")) if res[6] else ())


# --- membership ---

def recover(k, ttl_ms: int, max_attempts: int, failed_max: int, failed_ttl_ms: int, skip: str, slack_ms: int,
            keep_ms: Optional[int] = None, served=()) -> Call:
    """``keep_ms``: how long a job canceled here (cancel(running=True) its dead worker never read) keeps its
    record (RESULT_TTL; None: FAILED_TTL); ``served``: what :func:`served` built."""
    return Call("recover", [k.prefix, k.workers, k.suspects],
                [ttl_ms, max_attempts, failed_max, failed_ttl_ms, skip, slack_ms,
                 failed_ttl_ms if keep_ms is None else keep_ms, *served])


def served(meta: dict) -> list:
    """RECOVER's last section from ``jobs.meta()``: ``[name, concurrency or '', ...]`` for every job the worker
    knows: their held jobs (P:held:<name>) go back to their queues as far as the limit has room (issue 25)."""
    out: list = []
    for name, m in sorted(meta.items()):
        out += [name, m.get("concurrency") or ""]
    return out


class Recovered(list):
    """What RECOVER did (``'requeued:<id>'`` / ``'failed:<id>'`` items), and ``wait``: seconds until the grace of a
    worker seen late (not yet dead) ends, when another pass may find it dead; ``None`` if none."""

    def __init__(self, items, wait: Optional[float] = None):
        super().__init__(items)
        self.wait = wait


def parse_recover(res) -> Recovered:
    if res[0] == "wrongtype":  # nothing written (recover.lua)
        return Recovered([f"wrongtype:{res[1]}"])
    return Recovered(res[1:], float(res[0]) / 1000 if res[0] else None)


def heartbeat(k, worker: str, ttl_ms: int) -> Call:
    return Call("heartbeat", [k.workers, k.worker(worker)], [worker, ttl_ms])


def unregister(k, worker: str) -> Call:
    return Call("unregister", [k.workers, k.processing(worker), k.worker(worker)], [worker])


def wake(k, queues) -> Call:
    return Call("wake", [k.wake(q) for q in queues], [])


# --- periodic jobs, metrics ---

def schedule(k, rows: list) -> Call:
    """SCHEDULE: ``rows`` of (name, queue, tick, next, grace ms, ttl ms, spec, payload, job id, unique '1'/'')."""
    args = [k.prefix]
    for row in rows:
        args.extend(row)
    return Call("schedule", [k.paused, k.queues, k.schedules], args)


def stats(k, interval_ms: int, worker: str, all_known: bool, names) -> Call:
    return Call("stats", [k.prefix], [interval_ms, worker, "1" if all_known else "0", *names])


def parse_stats(res) -> tuple:
    """``(won, redis_now seconds, [(queue, depth, head payload or None), ...])``."""
    now = int(res[0]) + int(res[1]) / 1e6
    return bool(int(res[2])), now, [(res[i], int(res[i + 1]), res[i + 2]) for i in range(3, len(res), 3)]


# --- failed registry, dashboard, read model ---

def retry_failed(k, ids) -> Call:
    return Call("retry_failed", [k.prefix, k.failed, k.failed_data, k.queues], list(ids))


def run_now(k, payloads) -> Call:
    return Call("run_now", [k.prefix, k.scheduled, k.queues], list(payloads))


def housekeep(k, failed_ttl_ms: int, batch: int, sample_ttl_s: int) -> Call:
    return Call("housekeep", [k.prefix, k.failed, k.failed_data, k.processed, k.failed_count],
                [failed_ttl_ms, batch, sample_ttl_s])


def parse_housekeep(res) -> dict:
    return {"time": int(res[0]) + int(res[1]) / 1e6, "trimmed": int(res[2]),
            "wrong_typed": [x for x in (res[3] or "").split(",") if x]}


def failed_page(k, name: str, error: str, offset: int, limit: int) -> Call:
    return Call("failed_page", [k.failed, k.failed_data], [name, error, offset, limit])


def parse_failed_page(res) -> tuple:
    """``(total, matched, skipped, (names_json, types_json, skipped_ids_json), [record JSON, ...])``."""
    return int(res[0]), int(res[1]), int(res[2]), tuple(res[3:6]), list(res[6:])


def failed_match(k, name: str, error: str) -> Call:
    return Call("failed_match", [k.failed, k.failed_data], [name, error])


def find_queued(k, queue: str, job_id: str, name: Optional[str] = None) -> Call:
    """``name``: the job's name, to look among its held jobs too (issue 25; None: ``P:held:``, never written)."""
    return Call("find_queued", [k.queue(queue), k.held(name or "")], [f'"id":"{job_id}"'])


def backlog(k, all_known: bool, names) -> Call:
    return Call("backlog", [k.prefix], ["1" if all_known else "0", *names])


# --- the job API: wait, cancel ---

WAIT_MARK_MS = 365 * 86400 * 1000  # the expiry that marks a waited-for job's record (await.lua)


def await_(k, job_id: str) -> Call:
    return Call("await", [k.prefix], [job_id, WAIT_MARK_MS])


def cancel(k, job_id: str, keep_ms: int, running: bool = False) -> Call:
    return Call("cancel", [k.prefix, k.scheduled, k.workers], [job_id, keep_ms, "1" if running else ""])


# --- groups (issue 25 item 4) ---

def group(k, gid: str, chunk: int, total: int, callback: tuple, members: list, queues=()) -> Call:
    """GROUP chunk ``chunk`` (1-based) of group ``gid`` of ``total`` members: ``members`` = ``[(id, name, queue,
    payload), ...]``; ``callback`` = ``(payload, id, name, queue)`` and ``queues`` (every member's queue) are sent
    with chunk 1 only."""
    cb, qs = (callback, list(queues)) if chunk == 1 else (("", "", "", ""), [])
    args = [chunk, total, gid, *cb, len(qs), *qs, len(members)]
    for m in members:
        args.extend(m)
    return Call("group", [k.prefix, k.group(gid), k.group_ids(gid), k.group_res(gid), k.queues], args)
