"""Start the runtime without ever running an app's own top-level ``worker.py`` (issue 21 item 1).

Heroku's RQ guide has apps create ``worker.py`` next to their code; with the working directory first on
``sys.path``, ``python -m worker`` would then run that file (and exit 0: a crash-looping dyno with no error). The
console script ``heroku-fork-worker`` (pyproject.toml) starts from its own bin directory, so it always finds this
package; it refuses to run beside a colliding ``./worker.py`` (the app's ``from worker import enqueue`` would import
that file too), then puts the working directory on ``sys.path`` so ``JOB_MODULES`` import from it, as with
``python -m worker``.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def collision(cwd: Optional[str] = None) -> Optional[str]:
    """The path of a ``worker.py`` or ``worker/`` package in ``cwd`` that is not this package, else None."""
    cwd = cwd or os.getcwd()
    module = os.path.join(cwd, "worker.py")
    if os.path.isfile(module):
        return module
    package = os.path.join(cwd, "worker")
    if os.path.isfile(os.path.join(package, "__init__.py")) and \
            os.path.realpath(package) != os.path.realpath(PACKAGE_DIR):
        return package + os.sep
    return None


def collision_message(path: str) -> str:
    name = os.path.basename(path.rstrip(os.sep))
    return (f"error: {path} shadows the heroku-fork-worker package `worker` (the app's `import worker` would load it): "
            f"rename it, e.g. `git mv {name} rq_worker{'.py' if name.endswith('.py') else ''}`, and fix its imports")


def console(argv=None) -> int:
    """Entry point of the ``heroku-fork-worker`` console script (same commands as ``python -m worker``)."""
    path = collision()
    if path:
        print(collision_message(path), file=sys.stderr)
        return 2
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # JOB_MODULES import from the working directory, as under `python -m worker`
    from .cli import main
    return main(argv)
