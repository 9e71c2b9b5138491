"""Groups of jobs with a completion callback (issue 25 item 4; not QUEUE_GROUPS, issue 26)::

    from worker import group, get_group

    gid = group([send.call(1), send.call(2)], on_complete=report.call("batch 7")).enqueue()
    # report("batch 7", results=[{"id", "status", "result", "error"}, ...]) runs once every member has ended

How exactly once holds (the Lua side: ``prelude.lua``'s ``group_of``, ``group_end``, ``group_close``):

* A member's payload starts ``{"id":"<id>","group":"<gid>"`` (the callback's ``{"id":"<id>","gdone":"<gid>"``),
  so every script that records a job's end knows its group from the payload it already holds: ``cycle.lua``
  (done, failed, canceled), ``cancel.lua`` (a queued or scheduled member), ``recover.lua`` (written off at
  MAX_ATTEMPTS, or canceled while its worker was dead). Other jobs pay one ``string.sub`` per outcome.
* The member's end is recorded in its group in that same script call, once: ``HSETNX`` of its id into
  ``P:group_res:<gid>`` (a repeated call after a lost reply, a re-run, a recovered member find it there), and only
  then the group's ``pending`` count goes down. The call that takes it to 0 moves the callback's payload (built at
  enqueue, kept in ``P:group:<gid>``) to its queue. A retry or a put-back is not an end.
* The callback is then a job like any other (at-least-once: a SIGKILL mid-run runs it again, as every job); its
  ``results=`` are read from the group's keys when it runs (:func:`results`, in the job's own process), not built in
  Lua. When it ends for good, the group's keys expire with its status record (RESULT_TTL, FAILED_TTL if failed).
* Enqueue: one ``group.lua`` call per 1,000 members, all in one MULTI transaction; chunk 1 writes the total and the
  callback before any member is queued (``keys.py``: the group's keys).
"""
from __future__ import annotations

import json
import uuid
from typing import Any, Optional, Sequence

from . import jobs
from .calloptions import PendingJob
from .jobtypes import Pending
from .lua import calls as wire
from .payload import build_payload

BATCH = 1000  # members per GROUP call (one round trip each)


def _marked(payload: str, job_id: str, field: str, gid: str) -> str:
    """``payload`` with ``"<field>":"<gid>"`` right after its id, where the scripts look for it (prelude group_of)."""
    head = f'{{"id":"{job_id}"'
    if not payload.startswith(head):  # build_payload writes the id first, ours or a checked own one
        raise ValueError(f"payload of {job_id!r} does not start with its id")
    return f'{head},"{field}":"{gid}"{payload[len(head):]}'


def _check(c: Any, what: str) -> PendingJob:
    if not isinstance(c, PendingJob):
        raise TypeError(f"group: {what} must be a call made with f.call(...) (or f.options(...).call(...)), "
                        f"not {type(c).__name__}")
    return c


class Group:
    """A group of not-yet-enqueued calls and the call to make once every one has ended."""

    def __init__(self, members: Sequence[Pending], on_complete: Pending):
        if isinstance(members, (str, bytes, dict)):
            raise TypeError("group: members must be a list of calls made with f.call(...)")
        self.members = [_check(m, f"member {i}") for i, m in enumerate(members)]
        self.on_complete = _check(on_complete, "on_complete")
        cb = self.on_complete
        if "results" in cb.kwargs:
            raise TypeError("group: on_complete's call must not pass results= (the group passes the members' results)")
        spec = jobs.registered(cb.name)
        if spec is not None:
            try:
                spec.signature.bind(*cb.args, **cb.kwargs, results=[])
            except TypeError as exc:
                raise TypeError(f"group: on_complete job {cb.name}{spec.signature} must accept results=: {exc}") \
                    from None

    def enqueue(self) -> str:
        """Enqueue every member atomically, and keep the callback until the last one ends; returns the group id."""
        broker = jobs.default_broker()
        if getattr(broker, "inline", False):  # testing.inline()
            return broker.push_group(self.members, self.on_complete)
        return push(broker, self.members, self.on_complete)


def group(members: Sequence[Pending], on_complete: Pending) -> Group:
    """``group([f.call(...), ...], on_complete=g.call(...)).enqueue()``: see the module's docstring."""
    return Group(members, on_complete)


def build(members, on_complete, max_payload: int, gid: Optional[str] = None) -> tuple:
    """``(gid, [(id, name, queue, payload), ...], (payload, id, name, queue))``: the group's payloads, marked."""
    gid = gid or uuid.uuid4().hex
    out = []
    for m in members:
        job_id, q, p = build_payload(m.name, m.args, m.kwargs, m.queue, max_payload, options=m.options)
        out.append((job_id, m.name, q, _marked(p, job_id, "group", gid)))
    c = on_complete
    cb_id, cb_q, cb_p = build_payload(c.name, c.args, c.kwargs, c.queue, max_payload, options=c.options)
    return gid, out, (_marked(cb_p, cb_id, "gdone", gid), cb_id, c.name, cb_q)


def push(broker, members, on_complete, batch: int = BATCH) -> str:
    """Enqueue a group on ``broker`` (a ``fetch.Broker``): ceil(n / batch) GROUP calls in one MULTI transaction."""
    gid, rows, cb = build(members, on_complete, broker.cfg.max_payload)
    queues = sorted({r[2] for r in rows})
    broker = _space_of(broker, set(queues) | {cb[3]})
    chunks = [rows[i:i + batch] for i in range(0, len(rows), batch)] or [[]]
    with broker.r.pipeline(transaction=True) as pipe:
        for k, chunk in enumerate(chunks, 1):
            broker.scripts.run(wire.group(broker.keys, gid, k, len(rows), cb, chunk, queues), pipe)
        pipe.execute()
    return gid


def _space_of(broker, queues: set):
    """The key space the group goes to: its queues' group under QUEUE_GROUPS (all of them in one group: its count
    is kept in the scripts that record its members' ends, atomic within one hash slot), else ``broker`` itself."""
    space = getattr(broker, "space", None)
    if space is None or not broker.cfg.queue_groups:
        return broker
    found = {broker.cfg.group_of(q) for q in queues}  # ValueError for a queue in no group
    if len(found) > 1:
        raise ValueError(f"group: its members and callback must be in one queue group (QUEUE_GROUPS), not "
                         f"{', '.join(sorted(found))} (queues {', '.join(sorted(queues))}): nothing was enqueued")
    return space(next(iter(queues)))


def _holder(b, gid: str):
    """The broker of the key space that holds group ``gid`` (QUEUE_GROUPS: searched group by group), else ``b``."""
    spaces = b.spaces() if hasattr(b, "spaces") else [b]
    if len(spaces) > 1:
        for s in spaces:
            if s.r.exists(s.keys.group_ids(gid)) or s.r.exists(s.keys.group(gid)):
                return s
    return b


def _text(v) -> str:
    return v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v


def entry(job_id: str, raw) -> dict:
    """One member's ``results=`` item from its ``P:group_res:<gid>`` value (None: not ended)."""
    if raw is None:
        return {"id": job_id, "status": "pending", "result": None, "error": None}
    status, _, body = _text(raw).partition("\n")
    result = error = None
    try:
        if status == "done" and body:
            result = json.loads(body)
        elif status == "failed" and body:
            rec = json.loads(body)
            error = {"type": rec.get("type"), "message": rec.get("message")}
    except (ValueError, AttributeError):
        error = {"type": "Unreadable", "message": body[:200]}
    return {"id": job_id, "status": status, "result": result, "error": error}


def results(gid: str, broker=None) -> list:
    """The members' results in member order (what the callback gets as ``results=``): dicts ``{id, status, result,
    error}``; ``error`` is ``{type, message}`` for a failed member. Read in pages of 1,000."""
    b = _holder(broker or jobs.default_broker(), gid)
    k = b.keys
    ids = [_text(i) for i in b.r.lrange(k.group_ids(gid), 0, -1)]
    out = []
    with b.r.pipeline(transaction=False) as pipe:
        for i in range(0, len(ids), BATCH):
            pipe.hmget(k.group_res(gid), ids[i:i + BATCH])
        pages = pipe.execute()
    for i, page in enumerate(pages):
        out.extend(entry(job_id, raw) for job_id, raw in zip(ids[i * BATCH:(i + 1) * BATCH], page))
    return out


def get_group(gid: str, broker=None) -> Optional[dict]:
    """A group's progress: ``{id, total, done, failed, canceled, pending, created_at, completed_at, callback: {id,
    name, status}}`` (times in unix seconds; ``completed_at``: when its last member ended, the callback queued), or
    None for a group unknown or expired. ``callback.status`` is ``waiting`` until the last member ends, then the
    callback's own status (``get_job``)."""
    b = broker or jobs.default_broker()
    if getattr(b, "inline", False):
        return b.group_of(gid)
    b = _holder(b, gid)
    g = {_text(key): _text(v) for key, v in b.r.hgetall(b.keys.group(gid)).items()}
    if "total" not in g:
        return None
    status = "waiting"
    if g.get("fired"):
        status = _text(b.r.hget(b.keys.job(g.get("cb_id", "")), "status")) or "ended"
    n = {f: int(g.get(f) or 0) for f in ("total", "done", "failed", "canceled", "pending")}
    return {"id": gid, **n, "created_at": int(g["created"]) / 1000 if g.get("created") else None,
            "completed_at": int(g["fired"]) / 1000 if g.get("fired") else None,
            "callback": {"id": g.get("cb_id"), "name": g.get("cb_name"), "status": status,
                         "stuck": g.get("cb_stuck")}}


def callback_results(doc: dict) -> Any:
    """In a job's own process (child.py): the ``results=`` of a group's callback (its payload's ``gdone``)."""
    return results(doc["gdone"])


def main(cfg, gid: str) -> int:
    """``python -m worker group ID``: print :func:`get_group` as JSON (exit 0), or exit 1 if it is unknown."""
    import sys
    from .client import connect
    from .fetch import Broker
    b = Broker(connect(cfg, name="status"), cfg)
    try:
        g = get_group(gid, b)
    finally:
        b.r.close()
    if g is None:
        print(f"error: no group {gid!r} (unknown, or expired with its callback's status record)", file=sys.stderr)
        return 1
    print(json.dumps(g, indent=2))
    return 0
