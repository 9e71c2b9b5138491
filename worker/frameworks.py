"""What the fork server does for the app's framework, and how it reports an app that fails to import.

Django (issue 21 item 3): with ``DJANGO_SETTINGS_MODULE`` set, the fork server calls ``django.setup()`` before it
imports ``JOB_MODULES``, so a jobs module needs no set-up of its own (a ``django.setup()`` at its top breaks the
moment ``models.py`` imports it: "populate() isn't reentrant"). Before each fork the fork server closes Django's
database connections, so no two processes ever share one (each job opens its own on first query).

Flask and other frameworks need nothing here: a job that needs the app builds it (``create_app()``) or pushes an
app context itself.

Import errors (issue 21 item 4): :func:`import_failure` turns an exception raised while importing a job module into
the traceback's last frames (file and line) followed by a one-line summary, the summary last.
"""
from __future__ import annotations

import importlib
import os
import traceback

_django = False
FRAMES = 6  # the app's frames shown for an import error (the innermost ones, where the error is)


def setup() -> None:
    """Called by the fork server before it imports ``JOB_MODULES``. Errors propagate (reported as an import)."""
    global _django
    if os.environ.get("DJANGO_SETTINGS_MODULE", "").strip():
        import django
        django.setup()
        _django = True


def before_fork() -> None:
    """Called by the fork server before each fork: no database connection is shared with a child."""
    if _django:
        from django.db import connections
        connections.close_all()


def import_failure(module: str, exc: BaseException) -> tuple:
    """``(frames, summary)``: the last frames of ``exc``'s traceback that are not the import machinery's or this
    package's, as ``File "...", line N, in f`` lines with their source, and a one-line summary naming the innermost
    file:line. A missing module named in ``JOB_MODULES`` itself has no frames worth showing."""
    if isinstance(exc, ModuleNotFoundError) and exc.name is not None and \
            (module == exc.name or module.startswith(exc.name + ".")):
        return [], f"cannot import {module!r} ({type(exc).__name__}: {exc}); expected importable module paths"
    skip = {os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(importlib.__file__))}
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith("<frozen") and os.path.dirname(os.path.abspath(f.filename)) not in skip]
    if isinstance(exc, SyntaxError) and exc.filename:  # the error's own place is not a frame
        frames.append(traceback.FrameSummary(exc.filename, exc.lineno or 0, "<module>", line=exc.text or ""))
    frames = frames[-FRAMES:]
    lines = ["Traceback (most recent call last, import machinery left out):"] if frames else []
    for f in frames:
        lines.append(f'  File "{f.filename}", line {f.lineno}, in {f.name}')
        if f.line:
            lines.append(f"    {f.line.strip()}")
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return lines, f"cannot import {module!r}: {type(exc).__name__}: {text}{where}"

