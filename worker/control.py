"""Acting on one job by id: :func:`cancel` (issue 24 item 2). ``python -m worker cancel ID [--running]``.

A queued or scheduled job (a retry waiting in the schedule included) is taken out in one script call
(``worker/lua/cancel.lua``), atomic with the claim: it is either removed before a worker claims it (it never runs,
status ``canceled``) or already claimed (``cancel`` returns False and it runs to its end). Finding it scans its
queue (or the schedule) in Redis: O(length), a few ms for a long queue (docs/user-guide.md has the figure).
"""
from __future__ import annotations

#: why nothing was canceled, for the CLI's one line (the script's reason -> text)
REASONS = {"unknown": "no such job (unknown id, or its record has expired)",
           "done": "it has ended already (done)", "failed": "it has ended already (failed)",
           "canceled": "it was canceled already",
           "running": "a worker is running it (cancel --running asks that worker to stop it)",
           "missing": "it is in no queue and not scheduled (claimed, or moved by hand)",
           "wrongtype": "its status record is not a hash"}


def cancel_job(broker, job_id: str, running: bool = False) -> tuple:
    """``(done, reason)`` through ``broker``: ``(True, '')`` canceled; ``(True, '<worker>')`` (``running``) that
    worker was asked to stop it; ``(False, reason)``, reason a key of :data:`REASONS`."""
    from .lua import calls
    broker = broker.find(job_id) if callable(getattr(broker, "find", None)) else broker  # QUEUE_GROUPS: its group
    res = broker.scripts.run(calls.cancel(broker.keys, job_id, int(broker.cfg.result_ttl * 1000), running))
    return (int(res[0]) > 0, str(res[1]) if len(res) > 1 else "")


def cancel(job_id: str, running: bool = False) -> bool:
    """Cancel job ``job_id`` (the id ``enqueue`` returned): a queued or scheduled job (or its pending retry) is taken
    out so that it never runs, and its status becomes ``canceled`` (kept ``RESULT_TTL``). Returns whether it did:
    False for an unknown id, a job that has ended, or one a worker has claimed (a running job is not stopped by
    ``cancel``). Under ``worker.testing.inline()`` only a scheduled job held back (``run_scheduled=False``) can be.

    ``running=True``: a job a worker runs is stopped too, like USR1 but for that job only: its worker (told through
    Redis, at its next heartbeat: within ``HEARTBEAT_INTERVAL``) raises ``TermException`` in it, and kills it if it
    has not ended ``TERM_TIMEOUT`` later; it is not put back and ends ``canceled`` (``done`` if it returned all the
    same). Returns True once the stop is asked for; ``get_job(id).wait()`` waits for the end."""
    if not isinstance(job_id, str) or not job_id:
        raise TypeError("job id must be a non-empty string")
    from . import jobs, testing
    if testing.active():
        return testing.cancel(job_id)
    return cancel_job(jobs.default_broker(), job_id, running)[0]


def main(cfg, job_id: str, running: bool = False) -> int:
    """``python -m worker cancel ID [--running]``: exit 0 canceled, 1 not (with a one-line reason)."""
    import sys
    from .client import connect
    from .fetch import Broker
    broker = Broker(connect(cfg, name="cancel"), cfg)
    ok, reason = cancel_job(broker, job_id, running)
    if ok:
        print(f"canceled {job_id}" if not reason else f"asked worker {reason} to stop {job_id} (at its next beat)")
        return 0
    print(f"not canceled: {job_id}: {REASONS.get(reason, reason)}", file=sys.stderr)
    return 1


__all__ = ["cancel", "cancel_job", "REASONS", "main"]
