"""Configuration: read once from the environment (plus a local ``.env``) into a frozen, validated object.

Every other module receives a :class:`Config`; nothing else reads ``os.environ``.  A bad value raises
:class:`ConfigError` whose message is one line naming the variable, the value and what is accepted; the CLI prints
it and exits 2 before connecting anywhere.

The shutdown timeline is derived from one number, the platform's SIGTERM->SIGKILL window ``SHUTDOWN_WINDOW``, and
described once, in ``stops.py``. ``TERM_TIMEOUT`` defaults to ``WINDOW - 1.5 - TERM_GRACE`` (8.5 s at the 10 s
default) and is refused when ``TERM_GRACE + TERM_TIMEOUT > WINDOW - 1.0``: the last second is for killing, putting
back and exiting.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field, replace
from typing import Mapping, Optional
from urllib.parse import urlsplit

from .groups import QUEUE_RULE, GroupsError, queue_groups, valid_queue_name, worker_group  # noqa: F401

#: Seconds, counted back from the platform window, that belong to the runtime and not to the job.
KILL_MARGIN = 1.0   # kill + put back + exit must fit in this
EXIT_MARGIN = 0.5   # the worker is gone this long before the platform's SIGKILL
DEFAULT_SLACK = 1.5  # default TERM_TIMEOUT leaves this much of the window to the runtime

MIN_HEARTBEAT = 0.1  # a smaller interval would beat on every turn of the loop
BEAT_SLACK = 0.5     # room for one slow Redis call on top of two missed beats
MAX_CONCURRENCY = 64

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class ConfigError(Exception):
    """A configuration value is invalid. ``str(err)`` is the one-line message shown to the user."""


@dataclass(frozen=True)
class Config:
    """The whole runtime configuration. Build it with :func:`load`; never mutate it."""

    redis_url: str = "redis://localhost:6379/0"
    redis_tls_verify: bool = False
    redis_cluster: bool = False  # REDIS_CLUSTER: redis-py's cluster client; key_prefix is then "{KEY_PREFIX}"
    redis_timeout: float = 5.0
    queues: tuple = ("default",)
    job_modules: tuple = ("worker.sample",)
    shutdown_window: float = 10.0
    term_grace: float = 0.0
    term_timeout: float = 8.5
    job_timeout: float = 0.0
    job_retries: int = 0
    max_attempts: int = 5
    heartbeat_interval: float = 5.0
    heartbeat_ttl: float = 30.0
    failed_max: int = 10000
    failed_ttl: float = 7 * 24 * 3600.0
    max_payload: int = 512 * 1024
    key_prefix: str = "worker"
    log_level: str = "INFO"
    dyno: Optional[str] = None
    concurrency: int = 1
    job_max_memory_mb: int = 0
    max_interruptions: int = 0
    result_ttl: float = 500.0
    metrics_interval: float = 60.0
    # the web dashboard (worker/web): secrets never appear in a repr, a page, a log line or /metrics
    dashboard_password: Optional[str] = field(default=None, repr=False)
    dashboard_read_only: bool = False
    hirefire_token: Optional[str] = field(default=None, repr=False)
    port: Optional[int] = None  # $PORT (set by Heroku on web dynos): `python -m worker web` binds 0.0.0.0:PORT
    unknown_job_grace: float = 600.0
    # QUEUE_GROUPS (docs/cluster.md "Queue groups"): ((group, (queue, ...)), ...), () when not grouped. ``group`` is
    # the one this process's worker serves (key_prefix is then that group's key space); key_root is KEY_PREFIX as set
    queue_groups: tuple = ()
    group: str = ""
    key_root: str = "worker"

    @property
    def all_queues(self) -> bool:
        """True when ``QUEUES=*``: every queue known to Redis, in name order."""
        return self.queues == ("*",)

    @property
    def hard_exit_after(self) -> float:
        """Seconds after the first stop signal by which the worker process must be gone."""
        return self.shutdown_window - EXIT_MARGIN

    def group_prefix(self, group: str) -> str:
        """The key space of ``group``: ``KEY_PREFIX:<group>`` (``{KEY_PREFIX:<group>}`` on a cluster: its own hash tag,
        so groups land on different slots, and different primaries)."""
        prefix = f"{self.key_root}:{group}"
        return "{" + prefix + "}" if self.redis_cluster else prefix

    def space(self, group: str) -> "Config":
        """This configuration narrowed to ``group``: its key space, its queues (what a worker of it serves)."""
        queues = dict(self.queue_groups)[group]
        return replace(self, key_prefix=self.group_prefix(group), queues=queues, group=group)

    def spaces(self) -> list:
        """One configuration per key space: every group's (in QUEUE_GROUPS order), or just this one ungrouped."""
        return [self.space(g) for g, _ in self.queue_groups] if self.queue_groups else [self]

    def group_of(self, queue: str) -> str:
        """The group ``queue`` belongs to ('' when not grouped); ``ValueError`` for a queue in no group."""
        if not self.queue_groups:
            return ""
        for group, queues in self.queue_groups:
            if queue in queues:
                return group
        raise ValueError(f"queue {queue!r} is in no group of QUEUE_GROUPS "
                         f"({'; '.join(g + '=' + ','.join(qs) for g, qs in self.queue_groups)})")

    def worker_name(self, pid: Optional[int] = None) -> str:
        """Identity of one worker process: ``$DYNO`` (or the host name) plus the pid."""
        where = self.dyno or socket.gethostname()
        return f"{where}:{pid if pid is not None else os.getpid()}"


#: Longest RESULT_TTL / FAILED_TTL / @job(result_ttl=) (100 years): Redis's PEXPIRE refuses an expiry whose end
#: overflows its clock, and the scripts set it after the claim has left the processing list (issue 27 item 10).
MAX_TTL = 100 * 365 * 86400.0


def _number(env, name, default, *, minimum=0.0, integer=False, positive=False, maximum=None):
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    text = raw.strip()
    kind = "a whole number" if integer else "a number of seconds"
    bound = "> 0" if positive else f">= {minimum:g}"
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not valid: expected {kind} {bound}") from None
    if value != value or value in (float("inf"), float("-inf")) or value < minimum or (positive and value <= 0):
        raise ConfigError(f"{name}={raw!r} is not valid: expected {kind} {bound}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}={raw!r} is not valid: expected {kind} {bound} and <= {maximum:g}")
    return value


def _bool(env, name, default):
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not valid: expected true/false, 1/0, yes/no or on/off")


def _list(env, name, default, pattern, what):
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    items = tuple(part.strip() for part in raw.split(","))
    for item in items:
        if not item:
            raise ConfigError(f"{name}={raw!r} is not valid: empty name in the comma list; expected {what}")
        if not pattern.match(item):
            raise ConfigError(f"{name}={raw!r} is not valid: {item!r} is not {what}")
    return items


def redact_url(url: str) -> str:
    """The URL with every credential replaced by ``***`` (safe for logs and CLI output).

    Works on the raw text rather than a parse, so a password with an unescaped ``#``, ``/`` or ``?`` (which
    ``urlsplit`` would misread) is still hidden: everything between ``://`` and the last ``@`` goes, except a user
    name before ``:``; ``password=`` query arguments (which redis-py also accepts) are masked too.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<redacted>" if "@" in url or "password" in url.lower() else url
    if "@" in rest:
        creds, _, host = rest.rpartition("@")
        user = creds.split(":", 1)[0] if ":" in creds else ""
        rest = f"{user}:***@{host}" if ":" in creds else f"***@{host}"
    rest = re.sub(r"(?i)([?&;]password=)[^&;#]*", r"\1***", rest)
    return f"{scheme}://{rest}"


def _redis_url(env) -> str:
    raw = env.get("REDIS_URL")
    if raw is None or raw.strip() == "":
        if (env.get("DYNO") or "").strip():  # on a dyno localhost has no Redis: retrying it for ever helps nobody
            raise ConfigError(f"REDIS_URL is not set on dyno {env['DYNO'].strip()!r}: attach Redis "
                              f"(heroku addons:create heroku-redis) or set REDIS_URL (heroku config:set)")
        return Config.redis_url
    url = raw.strip()
    shown = redact_url(url)
    accepted = "expected redis://[:password@]host[:port][/db], rediss://... (TLS) or unix:///path"
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"REDIS_URL={shown!r} is not valid: {accepted}") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"REDIS_URL={shown!r} is not valid: unknown scheme; {accepted}")
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(f"REDIS_URL={shown!r} is not valid: no socket path; {accepted}")
    else:
        if not parts.hostname:
            raise ConfigError(f"REDIS_URL={shown!r} is not valid: no host; {accepted}")
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise ConfigError(f"REDIS_URL={shown!r} is not valid: database {db!r} is not a number; {accepted}")
    del port
    return url


def _cluster_url(url: str) -> None:
    """A cluster is reached over TCP and has database 0 only."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        raise ConfigError(f"REDIS_CLUSTER=1 is not valid with REDIS_URL={redact_url(url)!r}: a cluster is reached "
                          f"over TCP (redis:// or rediss://)")
    if parts.path.lstrip("/") not in ("", "0"):
        raise ConfigError(f"REDIS_CLUSTER=1 is not valid with REDIS_URL={redact_url(url)!r}: a cluster has "
                          f"database 0 only")


def from_mapping(env: Mapping[str, str]) -> Config:
    """Validate ``env`` (a mapping like ``os.environ``) into a :class:`Config`. Raises :class:`ConfigError`."""
    level = (env.get("LOG_LEVEL") or "INFO").strip().upper()
    if level == "WARN":
        level = "WARNING"
    if level not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL={env.get('LOG_LEVEL')!r} is not valid: expected one of {', '.join(LOG_LEVELS)}")
    try:
        groups = queue_groups(env.get("QUEUE_GROUPS"))
    except GroupsError as e:
        raise ConfigError(str(e)) from None
    at_group = (env.get("QUEUES") or "").strip()
    if at_group.startswith("@"):
        queues = ()
    else:
        queues = _list(env, "QUEUES", Config.queues, re.compile(r"^(\*|[A-Za-z0-9_.:-]{1,100})$"),
                       "a queue name (letters, digits, _ . : -) or *")
    if "*" in queues and len(queues) > 1:
        raise ConfigError(f"QUEUES={env.get('QUEUES')!r} is not valid: * means every queue and stands alone")
    try:
        group, queues = worker_group(env, groups, queues)
    except GroupsError as e:
        raise ConfigError(str(e)) from None
    prefix = (env.get("KEY_PREFIX") or "worker").strip()
    if not _PREFIX_RE.match(prefix):
        raise ConfigError(f"KEY_PREFIX={env.get('KEY_PREFIX')!r} is not valid: expected 1-64 of letters, digits, _ . : -")
    window = _number(env, "SHUTDOWN_WINDOW", Config.shutdown_window, positive=True)
    if window < 2.0:
        raise ConfigError(f"SHUTDOWN_WINDOW={env.get('SHUTDOWN_WINDOW')!r} is not valid: expected seconds >= 2")
    grace = _number(env, "TERM_GRACE", 0.0)
    default_timeout = max(0.0, window - DEFAULT_SLACK - grace)
    term_timeout = _number(env, "TERM_TIMEOUT", default_timeout)
    room = window - KILL_MARGIN
    if grace + term_timeout > room + 1e-9:
        raise ConfigError(
            f"TERM_TIMEOUT={term_timeout:g} is not valid: TERM_GRACE ({grace:g}) + TERM_TIMEOUT must be <= "
            f"SHUTDOWN_WINDOW ({window:g}) - {KILL_MARGIN:g} = {room:g} seconds, so the worker exits before SIGKILL")
    hb_interval = _number(env, "HEARTBEAT_INTERVAL", Config.heartbeat_interval, positive=True)
    if hb_interval < MIN_HEARTBEAT:
        raise ConfigError(f"HEARTBEAT_INTERVAL={env.get('HEARTBEAT_INTERVAL')!r} is not valid: expected seconds "
                          f">= {MIN_HEARTBEAT:g}")
    hb_ttl = _number(env, "HEARTBEAT_TTL", Config.heartbeat_ttl, positive=True)
    if hb_ttl < 2 * hb_interval + BEAT_SLACK:
        raise ConfigError(f"HEARTBEAT_TTL={hb_ttl:g} is not valid: expected at least twice HEARTBEAT_INTERVAL "
                          f"({hb_interval:g}) + {BEAT_SLACK:g} = {2 * hb_interval + BEAT_SLACK:g} seconds, or live "
                          f"workers would look dead")
    concurrency = _number(env, "WORKER_CONCURRENCY", 1, integer=True, minimum=1)
    if concurrency > MAX_CONCURRENCY:
        raise ConfigError(f"WORKER_CONCURRENCY={env.get('WORKER_CONCURRENCY')!r} is not valid: expected a whole "
                          f"number from 1 to {MAX_CONCURRENCY}")
    dyno = (env.get("DYNO") or "").strip() or None
    url, cluster = _redis_url(env), _bool(env, "REDIS_CLUSTER", False)
    root = prefix
    if cluster:
        _cluster_url(url)
        prefix = "{" + prefix + "}"  # one hash tag: every key of the key space in one slot (docs/cluster.md)
    if group:
        prefix = "{" + f"{root}:{group}" + "}" if cluster else f"{root}:{group}"  # (Config.group_prefix)
    return Config(
        redis_url=url,
        redis_tls_verify=_bool(env, "REDIS_TLS_VERIFY", False),
        redis_cluster=cluster,
        redis_timeout=_number(env, "REDIS_TIMEOUT", Config.redis_timeout, positive=True),
        queues=queues,
        job_modules=_list(env, "JOB_MODULES", Config.job_modules, _MODULE_RE, "an importable module path"),
        shutdown_window=window,
        term_grace=grace,
        term_timeout=term_timeout,
        job_timeout=_number(env, "JOB_TIMEOUT", 0.0),
        job_retries=_number(env, "JOB_RETRIES", 0, integer=True),
        max_attempts=_number(env, "MAX_ATTEMPTS", Config.max_attempts, integer=True, minimum=1),
        heartbeat_interval=hb_interval,
        heartbeat_ttl=hb_ttl,
        failed_max=_number(env, "FAILED_MAX", Config.failed_max, integer=True, minimum=1),
        failed_ttl=_number(env, "FAILED_TTL", Config.failed_ttl, positive=True, maximum=MAX_TTL),
        max_payload=_number(env, "MAX_PAYLOAD_BYTES", Config.max_payload, integer=True, minimum=64),
        key_prefix=prefix,
        log_level=level,
        dyno=dyno,
        concurrency=concurrency,
        job_max_memory_mb=_number(env, "JOB_MAX_MEMORY_MB", 0, integer=True),
        max_interruptions=_number(env, "MAX_INTERRUPTIONS", 0, integer=True),
        result_ttl=_number(env, "RESULT_TTL", Config.result_ttl, maximum=MAX_TTL),
        metrics_interval=_number(env, "METRICS_INTERVAL", Config.metrics_interval),
        dashboard_password=_secret(env, "DASHBOARD_PASSWORD", 8),
        dashboard_read_only=_bool(env, "DASHBOARD_READ_ONLY", False),
        hirefire_token=_secret(env, "HIREFIRE_TOKEN", 16),
        port=_port(env),
        unknown_job_grace=_number(env, "UNKNOWN_JOB_GRACE", Config.unknown_job_grace),
        queue_groups=groups,
        group=group,
        key_root=root,
    )


def _secret(env, name, min_len):
    """A secret (never echoed back: the message names the variable and the rule only)."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    value = raw.strip()
    if len(value) < min_len or any(c in value for c in "\r\n"):
        raise ConfigError(f"{name} is not valid: expected at least {min_len} characters on one line (value not shown)")
    return value


def _port(env):
    raw = env.get("PORT")
    if raw is None or raw.strip() == "":
        return None
    text = raw.strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(f"PORT={raw!r} is not valid: expected a TCP port number from 1 to 65535")
    return int(text)


def load(environ: Optional[Mapping[str, str]] = None, dotenv_path: Optional[str] = ".env",
         export: bool = True) -> Config:
    """Read the configuration once: ``.env`` (if present) under the real environment, which always wins.

    With ``export`` (the worker process and its commands), ``.env`` values are also placed in ``os.environ`` (without
    overriding anything) so that job code sees them as it would under ``heroku local``, honcho or foreman. The
    producer (``worker.enqueue`` in a web process) passes ``export=False``: it reads ``.env`` and leaves the
    process's environment as it found it (issue 21 item 8).
    """
    if environ is None:
        environ = os.environ
        if dotenv_path and os.path.exists(dotenv_path):
            if export:
                from dotenv import load_dotenv
                load_dotenv(dotenv_path, override=False)
            else:
                from dotenv import dotenv_values
                environ = {**{k: v for k, v in dotenv_values(dotenv_path).items() if v is not None}, **os.environ}
    return from_mapping(environ)
