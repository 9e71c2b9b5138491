"""``python -m worker [run|enqueue|status|job|cancel|failed|pause|resume] ...``

Every command reads the configuration first and exits 2 with a one-line message on a bad value, before connecting
anywhere. No command prints the Redis password.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import redis

from . import config as config_mod
from . import jobs
from .config import ConfigError, redact_url


def _parser() -> argparse.ArgumentParser:
    prog = "heroku-fork-worker" if sys.argv[0].endswith("heroku-fork-worker") else "python -m worker"
    p = argparse.ArgumentParser(prog=prog, description="Fork-per-job background worker on Redis.")
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run a worker (the default command)")
    run.add_argument("--burst", action="store_true", help="exit 0 once every configured queue is empty")
    p.add_argument("--burst", action="store_true", dest="top_burst", help=argparse.SUPPRESS)
    for where in (run, p):  # `python -m worker --burst --max-outage 10` and `... run --burst --max-outage 10`
        where.add_argument("--max-outage", type=float, default=None, metavar="SECONDS",
                           help=argparse.SUPPRESS if where is p else
                           f"with --burst: exit 1 once Redis has been unreachable this long (default {MAX_OUTAGE:g})")

    enq = sub.add_parser("enqueue", help="enqueue a registered job; prints its id")
    enq.add_argument("name")
    enq.add_argument("--args", default="[]", help="JSON array of positional arguments")
    enq.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments")
    enq.add_argument("--queue", default=None, help="queue (default: the job's own)")
    enq.add_argument("--in", dest="delay", type=float, default=None, help="run no sooner than SECONDS from now")

    st = sub.add_parser("status", help="queues, workers and totals")
    st.add_argument("--json", action="store_true", help="machine-readable output (schema in the README)")

    fl = sub.add_parser("failed", help="list, retry or remove failed jobs")
    fl.add_argument("action", nargs="?", default="list", choices=["list", "retry", "remove", "show"])
    fl.add_argument("id", nargs="?")
    fl.add_argument("--all", action="store_true", help="every failed job (retry/remove)")
    fl.add_argument("--json", action="store_true")
    fl.add_argument("--limit", type=int, default=50)
    fl.add_argument("--name", default=None, help="only jobs of this name (list, and retry/remove --all)")
    fl.add_argument("--type", default=None, help="only this error type, e.g. ValueError (list, retry/remove --all)")

    jb = sub.add_parser("job", help="what happened to a job: status, result or error")
    jb.add_argument("id")
    jb.add_argument("--json", action="store_true", help="one JSON object (the fields of worker.get_job)")

    gr = sub.add_parser("group", help="a group's progress (JSON; exit 1 if unknown or expired)")
    gr.add_argument("id")

    cn = sub.add_parser("cancel", help="cancel a queued or scheduled job (exit 1 if it could not be)")
    cn.add_argument("id")
    cn.add_argument("--running", action="store_true", help="if a worker runs it, ask that worker to stop it")

    sub.add_parser("web", help="serve the web dashboard on $PORT (needs DASHBOARD_PASSWORD; docs/dashboard.md)")

    for cmd in ("pause", "resume"):
        c = sub.add_parser(cmd, help=f"{cmd} claiming from a queue (or every queue) for all workers")
        c.add_argument("--queue", default="*", help="queue name (default: every queue)")
    return p


MAX_OUTAGE = 60.0  # seconds a --burst worker keeps retrying an unreachable Redis before it exits 1 (issue 21 item 2)


def _fail(msg: str, code: int = 2) -> int:
    """``error: MSG`` on stderr. A multi-line message (an app's import error) prints its detail lines first and
    keeps the one-line summary last."""
    *detail, last = msg.split("\n")
    for line in detail:
        print(line, file=sys.stderr)
    print(f"error: {last}", file=sys.stderr)
    return code


def _config_fail(exc) -> int:
    *detail, last = str(exc).split("\n")
    return _fail("\n".join(detail + [f"config: {last}"]))


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "run"
    try:
        # stored job messages and arguments may hold lone surrogates (os.fsdecode of a Latin-1 file name): show
        # them escaped rather than crash on a strict UTF-8 stdout (the worker's own log lines keep their setting)
        sys.stdout.reconfigure(line_buffering=True, **({} if command == "run" else {"errors": "backslashreplace"}))
    except AttributeError:
        pass
    max_outage = getattr(args, "max_outage", None)
    max_outage = MAX_OUTAGE if max_outage is None else max_outage
    if not (math.isfinite(max_outage) and max_outage > 0):
        return _fail(f"--max-outage must be a finite number of seconds > 0, not {max_outage}")
    if command == "failed" and args.limit < 0:
        return _fail(f"--limit must be 0 or more, not {args.limit}")
    if command == "enqueue" and args.delay is not None and not (math.isfinite(args.delay) and args.delay >= 0):
        return _fail(f"--in must be a finite number of seconds >= 0, not {args.delay}")
    try:
        cfg = config_mod.load()
        if command == "enqueue":  # a worker never imports the app itself: its fork server does (memory once)
            jobs.import_modules(cfg.job_modules)
    except ConfigError as exc:
        return _config_fail(exc)
    try:
        if command == "run":
            try:
                return _run(cfg, burst=getattr(args, "burst", False) or args.top_burst, max_outage=max_outage)
            except ConfigError as exc:  # JOB_MODULES failed to import in the fork server, before any connection
                return _config_fail(exc)
        if command == "enqueue":
            return _enqueue(cfg, args)
        if command == "status":
            from . import status
            return status.main(cfg, as_json=args.json)
        if command == "job":
            from . import status
            return status.job_main(cfg, args.id, as_json=args.json)
        if command == "group":
            from . import jobgroups
            return jobgroups.main(cfg, args.id)
        if command == "cancel":
            from . import control
            return control.main(cfg, args.id, running=args.running)
        if command == "failed":
            from . import failed
            return failed.main(cfg, args)
        if command == "web":
            from .web import serve
            return serve.main(cfg)
        if command in ("pause", "resume"):
            from . import status
            return status.pause(cfg, args.queue, paused=(command == "pause"))
    except redis.RedisError as exc:
        return _fail(f"Redis at {redact_url(cfg.redis_url)}: {type(exc).__name__}: {exc}", 1)
    return _fail(f"unknown command {command!r}")


def _run(cfg, burst: bool, max_outage: float = MAX_OUTAGE) -> int:
    from .client import connect
    from .fetch import Broker
    from .log import Logger, setup
    from .supervisor import Supervisor
    from . import orphans
    orphans.enable()  # a killed fork server's children, and what they left, come to us to end (orphans.py)
    setup(cfg.log_level, stamp=cfg.dyno is None)  # the fork server does the same; job children inherit it
    log = Logger(cfg.log_level, stamp=cfg.dyno is None, worker=cfg.worker_name())
    broker = Broker(connect(cfg, retries=0), cfg)  # the loop retries (with backoff) and never blocks on it
    sup = Supervisor(cfg, broker, log, burst=burst)
    sup.max_outage = max_outage
    return sup.run()


def _enqueue(cfg, args) -> int:
    # The rule of worker.enqueue: a name this process has not registered needs an explicit queue.
    spec = jobs.registered(args.name)
    if spec is None and args.queue is None:
        names = ", ".join(sorted(jobs.registry())) or "none"
        return _fail(f"job {args.name!r} is not registered by JOB_MODULES={','.join(cfg.job_modules)} "
                     f"(registered: {names}); add its module to JOB_MODULES, or pass --queue to enqueue it "
                     f"unchecked for workers that do register it")
    try:
        a = json.loads(args.args)
        kw = json.loads(args.kwargs)
    except ValueError as exc:
        return _fail(f"--args/--kwargs must be JSON ({exc})")
    if not isinstance(a, list):
        return _fail("--args must be a JSON array, e.g. '[1, \"x\"]'")
    if not isinstance(kw, dict):
        return _fail("--kwargs must be a JSON object, e.g. '{\"seconds\": 3}'")
    if spec is None:
        print(f"warning: job {args.name!r} is not registered by JOB_MODULES={','.join(cfg.job_modules)}: its name "
              f"and arguments are not checked; only a worker that registers it will run it", file=sys.stderr)
    else:
        try:
            spec.signature.bind(*a, **kw)
        except TypeError as exc:
            return _fail(f"arguments do not fit {args.name}: {exc}")
    from .client import connect
    from .fetch import Broker
    broker = Broker(connect(cfg, name="enqueue"), cfg)
    try:
        print(broker.push(args.name, a, kw, queue=args.queue, delay=args.delay or None))
    except (TypeError, ValueError) as exc:
        return _fail(str(exc))
    return 0
