"""One line per event on stdout, ``key=value`` pairs, unbuffered; Python ``logging`` records in the same format.

Without ``$DYNO`` each line starts with a UTC timestamp; on Heroku (``$DYNO`` set) it does not, because the
platform stamps every log line itself. Values are never a Redis URL with its password: callers pass
:func:`worker.config.redact_url` output only, and :func:`fmt` masks any ``://user:pass@`` it still finds.
"""
from __future__ import annotations

import logging
import re
import sys
import time

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}
_SECRET = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_QUERY_SECRET = re.compile(r"(?i)([?&;]password=)[^&;#\s]*")
_BARE = re.compile(r"^[A-Za-z0-9_.:/@+,*-]+$")


def _value(v) -> str:
    if isinstance(v, float):
        v = f"{v:.3f}"
    s = _QUERY_SECRET.sub(r"\1***", _SECRET.sub(r"\1***@", str(v)))
    return s if _BARE.match(s) else '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


_second = [-1, ""]  # the formatted second, reused for every line within it


def _stamp() -> str:
    now = time.time()
    sec = int(now)
    if sec != _second[0]:
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"ts={_second[1]}.{int((now - sec) * 1000):03d}Z "


def fmt(event: str, fields: dict, level: str = "info", stamp: bool = True) -> str:
    head = _stamp() if stamp else ""
    body = " ".join(f"{k}={_value(v)}" for k, v in fields.items() if v is not None)
    return f"{head}level={level} event={event}" + (f" {body}" if body else "")


class Logger:
    """Writes events at or above ``level``; ``bind`` adds fields to every line (e.g. the worker name)."""

    def __init__(self, level: str = "INFO", stamp: bool = True, stream=None, **bound):
        self.threshold = LEVELS.get(level.upper(), 20)
        self.stamp = stamp
        self.stream = stream or sys.stdout
        self.bound = bound

    def _emit(self, level: str, event: str, fields: dict) -> None:
        if LEVELS[level] < self.threshold:
            return
        line = fmt(event, {**fields, **self.bound}, level.lower(), self.stamp)
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stdout must not take the worker down

    def debug(self, event, **f):
        self._emit("DEBUG", event, f)

    def info(self, event, **f):
        self._emit("INFO", event, f)

    def warning(self, event, **f):
        self._emit("WARNING", event, f)

    def error(self, event, **f):
        self._emit("ERROR", event, f)

    def enabled(self, level: str) -> bool:
        return LEVELS[level] >= self.threshold


#: Fields added to every ``logging`` record's line in this process; ``context_source``, if set, supplies more
#: (a job child's ``job`` and ``name``, read only when a record is formatted).
context: dict = {}
context_source = None

_CONFIGURED = []


class KeyValueFormatter(logging.Formatter):
    """``logging`` records in the runtime's own line format: ``level=… event=log logger=… msg="…"`` plus the job's
    ``job=``/``name=`` inside a job, and the traceback (escaped onto the line) when there is one."""

    def __init__(self, stamp: bool = True):
        super().__init__()
        self.stamp = stamp

    def format(self, record: logging.LogRecord) -> str:
        fields = {"logger": record.name, "msg": record.getMessage(), **context}
        extra = context_source() if context_source is not None else None
        if extra:
            fields.update(extra)
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        level = "warning" if record.levelname == "WARN" else record.levelname.lower()
        return fmt("log", fields, level, self.stamp)


def attach_job_context(source) -> None:
    """Put the running job on every ``logging`` record this process creates, whatever handlers and formatters the
    app installs (Django's ``LOGGING`` replaces the root handler): ``record.job`` (its id) and ``record.job_name``,
    ``"-"`` outside a job, so ``%(job)s`` in an app's format never fails (issue 21). ``source()`` returns the job's
    ``{"job", "name"}`` or None; a record factory the app had already set still runs first."""
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        fields = source()
        record.job = fields["job"] if fields else "-"
        record.job_name = fields["name"] if fields else "-"
        return record

    logging.setLogRecordFactory(factory)


def setup(level: str = "INFO", stamp: bool = True, stream=None) -> None:
    """Configure the root logger once per process: one handler on stdout with :class:`KeyValueFormatter`, at
    ``LOG_LEVEL``. The worker and the fork server call it; job children inherit it. Third-party loggers (redis-py's
    warnings among them) and the app's own ``logging.getLogger(__name__)`` lines then come out in the same format."""
    if _CONFIGURED:
        return
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(KeyValueFormatter(stamp))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS.get(level.upper(), 20))
    # redis-py's own DEBUG chatter (one line per connection about server features) says nothing to a user of this
    # runtime; its INFO and above still come through, formatted like everything else
    logging.getLogger("redis").setLevel(max(LEVELS.get(level.upper(), 20), LEVELS["INFO"]))
    logging.captureWarnings(True)
    # before the app's import: its own handlers (Django's LOGGING) may use %(job)s from their first line
    attach_job_context(lambda: context_source() if context_source is not None else None)
    _CONFIGURED.append(handler)
