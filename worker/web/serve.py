"""``python -m worker web``: serve the dashboard with waitress (the ``web`` extra), e.g. ``web: python -m worker web``
in a Procfile. Binds ``0.0.0.0:$PORT`` when ``PORT`` is set (a Heroku web dyno), else ``127.0.0.1:8000`` (a laptop:
not reachable from the network). Needs ``DASHBOARD_PASSWORD`` (HTTP Basic, any user name): without it, exit 2 before
connecting anywhere."""
from __future__ import annotations

import sys

from ..config import Config, redact_url


def main(cfg: Config) -> int:
    if not cfg.dashboard_password:
        print("error: config: DASHBOARD_PASSWORD is not set: the standalone dashboard needs a password (HTTP Basic, "
              "any user name); set it, e.g. heroku config:set DASHBOARD_PASSWORD=$(openssl rand -hex 16)",
              file=sys.stderr)
        return 2
    try:
        import waitress
    except ImportError:
        print("error: python -m worker web needs waitress: pip install 'heroku-fork-worker[web]' (or waitress)",
              file=sys.stderr)
        return 2
    from . import make_app
    host, port = ("0.0.0.0", cfg.port) if cfg.port else ("127.0.0.1", 8000)
    app = make_app(cfg)
    print(f"dashboard on http://{host}:{port}/ (Redis {redact_url(cfg.redis_url)}"
          f"{', read-only' if app.read_only else ''})", flush=True)
    waitress.serve(app, host=host, port=port, ident="worker-dashboard", threads=4,
                   trusted_proxy="*" if cfg.dyno else None, trusted_proxy_headers={"x-forwarded-proto"}
                   if cfg.dyno else None, clear_untrusted_proxy_headers=True)
    return 0
