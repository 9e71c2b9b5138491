"""What a worker says when it starts, so no default stays silent (issue 21 item 5).

``worker.start`` carries the ``JOB_MODULES`` imported, every registered job with its queue, the queues served, and
the jobs' concurrency and rate limits (``limits=``, when there are some).
Two warnings follow when they apply: ``worker.queues_not_served`` names queues that registered jobs go to but
``QUEUES`` does not serve (their jobs would wait for another worker, perhaps for ever), and
``worker.module_without_jobs`` names a ``JOB_MODULES`` entry whose import registered no job (a typo'd module that
happens to exist, or jobs defined in a module it does not import).
"""
from __future__ import annotations


_UNIT = {1000: "s", 60000: "m", 3600000: "h"}


def limit(m: dict) -> str:
    """A job's limits as ``worker.start`` shows them: ``2`` (concurrency), ``10/s`` (rate), ``1+30/m`` (both)."""
    rate = f"{m['rate'][0]}/{_UNIT.get(m['rate'][1], str(m['rate'][1]) + 'ms')}" if m.get("rate") else ""
    return "+".join(str(x) for x in (m.get("concurrency"), rate) if x)


def fields(cfg, meta: dict) -> dict:
    """The ``worker.start`` fields: ``modules=a,b jobs=name@queue,... queues=...``, and ``limits=name:2,name:10/s``
    when some job has ``@job(concurrency=)`` or ``@job(rate=)`` (issue 25)."""
    limits = [f"{name}:{limit(m)}" for name, m in sorted(meta.items()) if m.get("concurrency") or m.get("rate")]
    return {"modules": ",".join(cfg.job_modules),
            "jobs": ",".join(f"{name}@{m['queue']}" for name, m in sorted(meta.items())) or "none",
            "queues": ",".join(cfg.queues), **({"limits": ",".join(limits)} if limits else {})}


def warn(cfg, meta: dict, log) -> None:
    """Log the start-up warnings (none when all is well)."""
    if not cfg.all_queues:
        unserved: dict = {}
        owner = {q: g for g, qs in cfg.queue_groups for q in qs}  # QUEUE_GROUPS: another group's workers serve theirs
        for name, m in sorted(meta.items()):
            if m["queue"] not in cfg.queues and owner.get(m["queue"], cfg.group) == cfg.group:
                unserved.setdefault(m["queue"], []).append(name)
        for queue, names in sorted(unserved.items()):
            note = (f"QUEUES does not include {queue!r}: add it, or run a worker with QUEUES={queue}"
                    if queue in owner or not cfg.queue_groups else
                    f"{queue!r} is in no group of QUEUE_GROUPS: its jobs cannot be enqueued; add it to a group")
            log.warning("worker.queues_not_served", queue=queue, jobs=",".join(names), queues=",".join(cfg.queues),
                        note=note)
    # an entry counts if its import registered a job, or a job is defined in it or below it (an earlier entry may
    # have imported it first)
    registering = {m.get("module") for m in meta.values()} | {m.get("defined_in") for m in meta.values()}
    for module in cfg.job_modules:
        if not any(r and (r == module or r.startswith(module + ".")) for r in registering):
            log.warning("worker.module_without_jobs", module=module,
                        note="its import registered no @job: check the module name, or that it imports its jobs")
