"""The web dashboard: a WSGI application over the read model (worker/api.py). See docs/dashboard.md.

    from worker.web import make_app
    app = make_app()                                   # HTTP Basic with DASHBOARD_PASSWORD
    app = make_app(authorize=lambda environ: ...)      # mounted: the host app decides who may see it
    app = make_app(read_only=True)                     # no action shown, every POST refused

The worker never imports this package; the standalone server (``python -m worker web``) uses waitress, from the
``web`` extra (``pip install 'heroku-fork-worker[web]'``).
"""
from .app import Dashboard, make_app

__all__ = ["Dashboard", "make_app"]
