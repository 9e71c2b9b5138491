"""The dashboard as a plain WSGI application (no framework): routing, authentication, CSRF, security headers.

Security model (docs/dashboard.md):

- Authentication: ``authorize(environ) -> bool`` (the host app's hook when mounted), else HTTP Basic against
  ``DASHBOARD_PASSWORD`` (any user name, ``hmac.compare_digest``). With neither, :func:`make_app` refuses to build.
- Every state change is a POST that passes three checks, else 403: the request is same-origin (``Sec-Fetch-Site:
  same-origin``, or an ``Origin`` equal to this host when the browser sends no Sec-Fetch-Site; neither header:
  refused), it carries the CSRF token of its cookie (double submit; the cookie is HttpOnly, SameSite=Strict), and the
  dashboard is not read-only.
- Read-only (``DASHBOARD_READ_ONLY=1`` or ``make_app(read_only=True)``): no action is shown and every POST is 403.
- Every page is built with :func:`worker.web.pages.h` escaping every value; the Content-Security-Policy allows
  scripts from this origin only (no inline script), so a hostile job argument shows as text.
- ``/hirefire/<token>/info`` is authenticated by its token (``HIREFIRE_TOKEN``), not by the password.
"""
from __future__ import annotations

import base64
import hmac
import json
import mimetypes
import re
import secrets
from http.cookies import SimpleCookie
from importlib import resources
from typing import Callable, Optional
from urllib.parse import parse_qs

from ..config import Config, ConfigError, valid_queue_name
from . import pages

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = [("Content-Security-Policy", CSP), ("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"),
           ("Referrer-Policy", "same-origin"), ("Cache-Control", "no-store")]
CSRF_COOKIE = "worker_dashboard_csrf"
MAX_BODY = 1024 * 1024
STATIC = {"dashboard.css", "dashboard.js"}


class Forbidden(Exception):
    pass


class Request:
    def __init__(self, environ):
        self.environ = environ
        self.method = environ.get("REQUEST_METHOD", "GET").upper()
        self.root = environ.get("SCRIPT_NAME", "").rstrip("/")
        self.path = environ.get("PATH_INFO", "") or "/"
        self.query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        self._form = None
        cookie = SimpleCookie()
        try:
            cookie.load(environ.get("HTTP_COOKIE", ""))
        except Exception:  # a malformed cookie header is just no cookie
            pass
        self.cookies = {k: m.value for k, m in cookie.items()}

    def arg(self, name, default=""):
        return (self.query.get(name) or [default])[0]

    def int_arg(self, name, default=1):
        try:
            return max(1, int(self.arg(name, str(default))))
        except ValueError:
            return default

    @property
    def form(self) -> dict:
        if self._form is None:
            try:
                n = min(int(self.environ.get("CONTENT_LENGTH") or 0), MAX_BODY)
            except ValueError:
                n = 0
            raw = self.environ["wsgi.input"].read(n) if n > 0 else b""
            self._form = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
        return self._form

    def field(self, name, default=""):
        return (self.form.get(name) or [default])[0]

    def origin(self) -> str:
        scheme = self.environ.get("HTTP_X_FORWARDED_PROTO") or self.environ.get("wsgi.url_scheme", "http")
        host = self.environ.get("HTTP_HOST") or self.environ.get("SERVER_NAME", "")
        return f"{scheme.split(',')[0].strip()}://{host}"


class Dashboard:
    """The WSGI callable. Build it with :func:`make_app`."""

    def __init__(self, cfg: Config, r, authorize: Optional[Callable] = None, read_only: Optional[bool] = None):
        from ..api_groups import read_model
        from .actions import actions
        if authorize is None and not cfg.dashboard_password:
            raise ConfigError("DASHBOARD_PASSWORD is not set: the dashboard needs it (HTTP Basic), or mount it with "
                              "make_app(authorize=...) to use the host app's authentication")
        self.cfg, self.r = cfg, r
        self.authorize = authorize
        self.read_only = cfg.dashboard_read_only if read_only is None else bool(read_only)
        self.api, self.actions = read_model(r, cfg), actions(r, cfg)
        self._layout = resources.files(__package__).joinpath("templates/layout.html").read_text("utf-8")

    # --- WSGI ---

    def __call__(self, environ, start_response):
        req = Request(environ)
        try:
            status, headers, body = self.dispatch(req)
        except Forbidden as exc:
            status, headers, body = "403 Forbidden", [("Content-Type", "text/plain; charset=utf-8")], \
                f"403 Forbidden: {exc}\n".encode()
        start_response(status, headers + HEADERS)
        return [body] if req.method != "HEAD" else [b""]

    def dispatch(self, req: Request):
        path = req.path
        if path.startswith("/hirefire/"):
            return self.hirefire(req)
        if path.startswith("/static/"):
            return self.static(path[len("/static/"):])
        if not self.authenticated(req):
            if self.authorize is not None:  # the host app's hook said no: no password prompt to show
                return "403 Forbidden", [("Content-Type", "text/plain; charset=utf-8")], b"403 Forbidden\n"
            return ("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                         ("WWW-Authenticate", 'Basic realm="jobs dashboard", charset="UTF-8"')],
                    b"401 Unauthorized: log in with the dashboard password (DASHBOARD_PASSWORD)\n")
        if req.method == "POST":
            self.check_post(req)
            return self.post(req)
        if req.method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", [("Allow", "GET, HEAD, POST")], b""
        return self.get(req)

    # --- auth and CSRF ---

    def authenticated(self, req: Request) -> bool:
        if self.authorize is not None:
            return bool(self.authorize(req.environ))
        auth = req.environ.get("HTTP_AUTHORIZATION", "")
        if not auth.lower().startswith("basic "):
            return False
        try:
            user_pass = base64.b64decode(auth[6:].strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return False
        password = user_pass.partition(":")[2]
        return hmac.compare_digest(password.encode(), self.cfg.dashboard_password.encode())

    def check_post(self, req: Request) -> None:
        if self.read_only:
            raise Forbidden("this dashboard is read-only")
        site = req.environ.get("HTTP_SEC_FETCH_SITE")
        origin = req.environ.get("HTTP_ORIGIN")
        if site is not None:
            if site != "same-origin":
                raise Forbidden(f"cross-site request (Sec-Fetch-Site: {site})")
        elif origin is None or origin != req.origin():
            raise Forbidden("not a same-origin request (no Sec-Fetch-Site, Origin missing or foreign)")
        cookie, token = req.cookies.get(CSRF_COOKIE, ""), req.field("csrf")
        if not cookie or not token or not hmac.compare_digest(cookie.encode(), token.encode()):
            raise Forbidden("missing or wrong CSRF token: reload the page and try again")

    def csrf(self, req: Request) -> tuple:
        """This browser's token, and the Set-Cookie header when it has none yet."""
        token = req.cookies.get(CSRF_COOKIE, "")
        if re.fullmatch(r"[A-Za-z0-9_-]{32,64}", token):
            return token, []
        token = secrets.token_urlsafe(32)
        secure = "; Secure" if req.origin().startswith("https:") else ""
        return token, [("Set-Cookie", f"{CSRF_COOKIE}={token}; Path={req.root or '/'}; HttpOnly; "
                                      f"SameSite=Strict{secure}")]

    # --- GET ---

    def get(self, req: Request):
        path, live = req.path, req.arg("live") == "1"
        if path == "/metrics":
            return "200 OK", [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")], \
                pages.metrics(self.api.overview()).encode()
        view = self.view(req)
        if view is None:
            return self.html(req, "Not found", pages.p("Nothing here."), {}, status="404 Not Found")
        if isinstance(view, str):  # a redirect
            return "303 See Other", [("Location", req.root + view)], b""
        title, body, values = view
        if live:
            return "200 OK", [("Content-Type", "application/json")], json.dumps(values).encode()
        return self.html(req, title, body, values)

    def view(self, req: Request):
        path, ro = req.path, self.read_only
        ctx = pages.Ctx(req.root, "", ro)
        if path in ("/", ""):
            return pages.overview(ctx, self.api.overview())
        m = re.fullmatch(r"/queues/([^/]+)", path)
        if m and valid_queue_name(m.group(1)):
            return pages.queue(ctx, self.api.queue(m.group(1), req.int_arg("page")))
        if path == "/jobs":
            job_id = req.arg("id").strip()
            return f"/jobs/{pages.quote(job_id)}" if job_id else "/"
        m = re.fullmatch(r"/jobs/([^/]{1,200})", path)
        if m:
            return pages.job(ctx, m.group(1), self.api.job(m.group(1)))
        if path == "/failed":
            return pages.failed(ctx, self.api.failed(req.arg("name"), req.arg("type"), req.int_arg("page")),
                                req.arg("name"), req.arg("type"))
        if path == "/failed/confirm":
            name, etype, action = req.arg("name"), req.arg("type"), req.arg("action")
            if action not in ("retry", "delete"):
                return None
            return pages.confirm(ctx, action, name, etype, self.api.failed(name, etype, per_page=0)["matched"])
        if path == "/scheduled":
            return pages.scheduled(ctx, self.api.scheduled(req.int_arg("page")))
        if path == "/periodic":
            return pages.periodic(ctx, self.api.overview())
        return None

    def html(self, req, title, body, values, status="200 OK"):
        token, cookie = self.csrf(req)
        body = body.replace(pages.CSRF_SLOT, pages.h(token))
        counts = pages.counts(self.r, self.cfg)
        mode = '<span class="mode">read-only</span>' if self.read_only else ""
        flash = req.arg("done")
        page = (self._layout.replace("$title", pages.h(title)).replace("$root", pages.h(req.root))
                .replace("$live_url", pages.h(req.root + req.path + "?" + _live_query(req)))
                .replace("$failed", str(counts[0])).replace("$scheduled", str(counts[1]))
                .replace("$time", pages.h(pages.iso(counts[2]))).replace("$mode", mode)
                .replace("$flash", f'<p class="flash">{pages.h(flash)}</p>' if flash else "")
                .replace("$body", body))
        return status, [("Content-Type", "text/html; charset=utf-8")] + cookie, page.encode("utf-8")

    # --- POST ---

    def post(self, req: Request):
        path, a = req.path, self.actions
        ids = [i for i in req.form.get("id", []) if i]
        payloads = [p for p in req.form.get("payload", []) if p]
        back = req.field("back") if req.field("back").startswith("/") and not req.field("back").startswith("//") \
            else "/"
        m = re.fullmatch(r"/queues/([^/]+)/(pause|resume|delete)", path)
        if m and valid_queue_name(m.group(1)):
            q, verb = m.groups()
            if verb == "pause":
                a.pause(q)
                done = f"paused queue {q}"
            elif verb == "resume":
                a.resume(q)
                done = f"resumed queue {q}"
            else:
                done = f"deleted {a.delete_queued(q, req.field('payload'))} waiting job(s)"
            return self.redirect(req, back, done)
        if path in ("/failed/retry", "/failed/delete"):
            if req.field("all") == "1":
                if req.field("confirm") != "yes":
                    raise Forbidden("bulk actions need the confirmation step")
                ids = self.api.failed_matching(req.field("name"), req.field("type"))
            verb = path.rsplit("/", 1)[1]
            n = a.retry_failed(ids) if verb == "retry" else a.delete_failed(ids)
            return self.redirect(req, back, f"{'retried' if verb == 'retry' else 'deleted'} {n} failed job(s)")
        m = re.fullmatch(r"/jobs/([^/]+)/cancel", path)
        if m:
            from ..control import REASONS
            ok, why = a.cancel(m.group(1))
            return self.redirect(req, f"/jobs/{pages.quote(m.group(1))}",
                                 "canceled the job" if ok else f"not canceled: {REASONS.get(why, why)}")
        if path in ("/scheduled/run", "/scheduled/delete"):
            verb = path.rsplit("/", 1)[1]
            n = a.run_scheduled(payloads) if verb == "run" else a.delete_scheduled(payloads)
            return self.redirect(req, back, f"{'queued' if verb == 'run' else 'deleted'} {n} scheduled job(s)")
        return "404 Not Found", [("Content-Type", "text/plain")], b"404 Not Found\n"

    @staticmethod
    def redirect(req, back, done):
        sep = "&" if "?" in back else "?"
        return "303 See Other", [("Location", f"{req.root}{back}{sep}done={pages.quote(done)}")], b""

    # --- machine endpoints ---

    def hirefire(self, req: Request):
        m = re.fullmatch(r"/hirefire/([^/]+)/info", req.path)
        token = self.cfg.hirefire_token
        if not token or not m or not hmac.compare_digest(m.group(1).encode(), token.encode()):
            return "404 Not Found", [("Content-Type", "text/plain")], b"404 Not Found\n"
        if self.cfg.queue_groups:  # QUEUE_GROUPS: one entry per group, named as its process type (docs/cluster.md)
            body = [{"name": a.cfg.group, "value": a.backlog(("*",))} for a in self.api.parts]
        else:
            body = [{"name": "worker", "value": self.api.backlog(self.cfg.queues)}]
        return "200 OK", [("Content-Type", "application/json"),
                          ("Cache-Control", "must-revalidate, private, max-age=0")], json.dumps(body).encode()

    @staticmethod
    def static(name: str):
        if name not in STATIC:
            return "404 Not Found", [("Content-Type", "text/plain")], b"404 Not Found\n"
        data = resources.files(__package__).joinpath("static", name).read_bytes()
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return "200 OK", [("Content-Type", f"{kind}; charset=utf-8"), ("Cache-Control", "max-age=300")], data


def _live_query(req) -> str:
    keep = [f"{k}={pages.quote(v[0])}" for k, v in req.query.items() if k not in ("live", "done") and v]
    return "&".join(keep + ["live=1"])


def make_app(cfg: Optional[Config] = None, *, authorize: Optional[Callable] = None, read_only: Optional[bool] = None,
             redis_client=None) -> Dashboard:
    """The dashboard WSGI app. ``cfg``: a :class:`worker.config.Config` (default: read from the environment).
    ``authorize(environ) -> bool``: the host app's check (mounted); without it, HTTP Basic with
    ``DASHBOARD_PASSWORD``. ``read_only``: overrides ``DASHBOARD_READ_ONLY`` for this mount."""
    if cfg is None:
        from ..config import load
        cfg = load()
    if redis_client is None:
        from ..client import connect
        redis_client = connect(cfg, name="dashboard")
    return Dashboard(cfg, redis_client, authorize=authorize, read_only=read_only)
