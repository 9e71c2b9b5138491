"""The read model over queue groups (``QUEUE_GROUPS``, worker/groups.py): one :class:`worker.api.API` per group's key
space, merged, so ``status``, ``job``, ``failed`` and the dashboard see every group. :func:`read_model` is what they
open: the plain :class:`~worker.api.API` when nothing is grouped (no extra cost), else a :class:`GroupsAPI`.

Each group is read by its own API on its own client (on a cluster, the node that holds the group's slot): a call
costs what :class:`~worker.api.API` documents, once per group. Merged documents carry the group of each queue,
worker, job and failed record (``"group"``) and ``"groups"``: ``[{"name", "prefix", "queues"}]``.
"""
from __future__ import annotations

from typing import Optional

from .api import API
from .client import for_space


def read_model(r, cfg):
    """The read model for ``cfg``: :class:`API` ungrouped, :class:`GroupsAPI` with QUEUE_GROUPS."""
    return GroupsAPI(r, cfg) if cfg.queue_groups else API(r, cfg)


def part_of(parts: list, cfg, queue: str):
    """The part (a per-group object with ``.cfg``) of ``queue``'s group; the first for a queue in no group (it
    holds nothing there: a page shows it empty rather than failing)."""
    try:
        group = cfg.group_of(queue)
    except ValueError:
        return parts[0]
    return next(p for p in parts if p.cfg.group == group)


class GroupsAPI:
    """:class:`~worker.api.API`'s methods over every group (see the module docstring)."""

    def __init__(self, r, cfg):
        self.r, self.cfg = r, cfg
        self.parts = [API(for_space(r, s.key_prefix), s) for s in cfg.spaces()]

    def housekeep(self) -> dict:
        res = [a.housekeep() for a in self.parts]
        return {"time": max(x["time"] for x in res), "trimmed": sum(x["trimmed"] for x in res),
                "wrong_typed": [k for x in res for k in x["wrong_typed"]]}

    def overview(self) -> dict:
        docs = [(a.cfg.group, a.overview()) for a in self.parts]
        out = dict(docs[-1][1])
        out["time"] = max(d["time"] for _, d in docs)
        out["paused"] = sorted({p for _, d in docs for p in d["paused"]})
        out["queues"] = [dict(q, group=g) for g, d in docs for q in d["queues"]]
        out["workers"] = [dict(w, group=g) for g, d in docs for w in d["workers"]]
        out["failed"] = sum(d["failed"] for _, d in docs)
        out["scheduled"] = sum(d["scheduled"] for _, d in docs)
        out["totals"] = {k: sum(d["totals"][k] for _, d in docs) for k in ("processed", "failed")}
        out["schedules"] = sorted((dict(s, group=g) for g, d in docs for s in d["schedules"]),
                                  key=lambda s: s["name"])
        out["throughput"] = [_add_minutes([d["throughput"][i] for _, d in docs])
                             for i in range(len(docs[0][1]["throughput"]))]
        out["skipped"] = [f"group {g}: {s}" for g, d in docs for s in d["skipped"]]
        out["groups"] = [{"name": a.cfg.group, "prefix": a.cfg.key_prefix, "queues": list(a.cfg.queues)}
                         for a in self.parts]
        return out

    def backlog(self, queues) -> int:
        if "*" in queues:
            return sum(a.backlog(("*",)) for a in self.parts)
        return sum(a.backlog(mine) for a in self.parts if (mine := [q for q in queues if q in a.cfg.queues]))

    def queue(self, name: str, page: int = 1, per_page: int = 50) -> dict:
        a = part_of(self.parts, self.cfg, name)
        return dict(a.queue(name, page, per_page), group=a.cfg.group)

    def job(self, job_id: str) -> Optional[dict]:
        """The first group's record of ``job_id``; of an id in several groups, the one that has not ended."""
        found = None
        for a in self.parts:
            doc = a.job(job_id)
            if doc is not None:
                if doc.get("status") in ("queued", "scheduled", "running"):
                    return dict(doc, group=a.cfg.group)
                found = found or dict(doc, group=a.cfg.group)
        return found

    def failed(self, name: str = "", error: str = "", page: int = 1, per_page: int = 50) -> dict:
        """The newest first over every group: each group's first ``page * per_page`` matches, merged by time."""
        page, per_page = max(1, int(page)), max(0, min(1000, int(per_page)))
        docs = [(a.cfg.group, a.failed(name, error, 1, page * per_page)) for a in self.parts]
        jobs = sorted((dict(j, group=g) for g, d in docs for j in d["jobs"]),
                      key=lambda j: j.get("failed_at") if isinstance(j.get("failed_at"), (int, float)) else 0,
                      reverse=True)
        matched = sum(d["matched"] for _, d in docs)
        names, types = {}, {}
        for _, d in docs:
            for n, c in d["names"].items():
                names[n] = names.get(n, 0) + c
            for n, c in d["types"].items():
                types[n] = types.get(n, 0) + c
        return {"count": sum(d["count"] for _, d in docs), "matched": matched, "page": page, "per_page": per_page,
                "pages": max(1, -(-matched // per_page)) if per_page else 1,
                "jobs": jobs[(page - 1) * per_page:page * per_page], "names": names, "types": types,
                "skipped": [f"group {g}: {s}" for g, d in docs for s in d["skipped"]]}

    def failed_record(self, job_id: str) -> Optional[dict]:
        for a in self.parts:
            rec = a.failed_record(job_id)
            if rec is not None:
                return rec
        return None

    def failed_matching(self, name: str = "", error: str = "") -> list:
        return [i for a in self.parts for i in a.failed_matching(name, error)]

    def scheduled(self, page: int = 1, per_page: int = 50) -> dict:
        page, per_page = max(1, int(page)), max(1, min(500, int(per_page)))
        docs = [(a.cfg.group, a.scheduled(1, page * per_page)) for a in self.parts]
        jobs = sorted((dict(j, group=g) for g, d in docs for j in d["jobs"]), key=lambda j: j["due"])
        total = sum(d["count"] for _, d in docs)
        return {"count": total, "page": page, "per_page": per_page, "pages": max(1, -(-total // per_page)),
                "jobs": jobs[(page - 1) * per_page:page * per_page],
                "skipped": [f"group {g}: {s}" for g, d in docs for s in d["skipped"]],
                "time": max(d["time"] for _, d in docs)}


def _add_minutes(rows: list) -> dict:
    """One minute of the throughput chart summed over groups (None where no group was sampled then)."""
    seen = [r for r in rows if r["processed"] is not None]
    return {"minute": rows[0]["minute"], "processed": sum(r["processed"] for r in seen) if seen else None,
            "failed": sum(r["failed"] for r in seen) if seen else None}
