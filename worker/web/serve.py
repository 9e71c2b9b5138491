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
    # on a dyno, Heroku's router terminates TLS and says so in X-Forwarded-Proto (Secure cookie, Origin check)
    proxy = {"trusted_proxy": "*", "trusted_proxy_headers": {"x-forwarded-proto"}} if cfg.dyno else {}
    server = waitress.create_server(app, host=host, port=port, ident="worker-dashboard", threads=4,
                                    clear_untrusted_proxy_headers=True, **proxy)
    # said once the socket listens, so whoever waits for this line can connect
    print(f"dashboard on http://{host}:{port}/ (Redis {redact_url(cfg.redis_url)}"
          f"{', read-only' if app.read_only else ''})", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0
