"""The web dashboard (worker/web) at the WSGI level against the real Redis: authentication, CSRF and same-origin
checks, escaping, read-only mode, /metrics, HireFire, and mounting under Django, Flask and a plain WSGI prefix."""
import base64
import io
import json
import re
import subprocess
import sys
from urllib.parse import urlencode

import pytest
import redis

from tests.conftest import REPO
from worker import config
from worker.keys import Keys
from worker.web import make_app

K = Keys("worker")
PASSWORD = "correct horse battery"
HOSTILE = '<img src=x onerror=alert(1)>'


def basic(password=PASSWORD, user="anyone"):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class Client:
    """A minimal WSGI client: environ in, (status, headers, text) out; keeps the CSRF cookie like a browser."""

    def __init__(self, app, auth=basic(), script_name=""):
        self.app, self.auth, self.script_name, self.cookies = app, auth, script_name, {}

    def call(self, method, path, form=None, headers=None):
        path, _, query = path.partition("?")
        body = urlencode(form or {}, doseq=True).encode()
        env = {"REQUEST_METHOD": method, "SCRIPT_NAME": self.script_name, "PATH_INFO": path, "QUERY_STRING": query,
               "SERVER_NAME": "dash.test", "SERVER_PORT": "80", "HTTP_HOST": "dash.test", "wsgi.url_scheme": "http",
               "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)),
               "CONTENT_TYPE": "application/x-www-form-urlencoded"}
        if self.auth:
            env["HTTP_AUTHORIZATION"] = self.auth
        if self.cookies:
            env["HTTP_COOKIE"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        for k, v in (headers or {}).items():
            env["HTTP_" + k.upper().replace("-", "_")] = v
        got = {}

        def start_response(status, hdrs):
            got["status"], got["headers"] = status, hdrs
        text = b"".join(self.app(env, start_response)).decode()
        for k, v in got["headers"]:
            if k == "Set-Cookie":
                name, _, rest = v.partition("=")
                self.cookies[name] = rest.split(";")[0]
        return int(got["status"][:3]), dict(got["headers"]), text

    def get(self, path, **kw):
        return self.call("GET", path, **kw)

    def post(self, path, form, same_origin=True, token=True, **kw):
        headers = {"Sec-Fetch-Site": "same-origin"} if same_origin else {}
        form = dict(form)
        if token:
            form["csrf"] = self.cookies.get("worker_dashboard_csrf", "")
        return self.call("POST", path, form=form, headers={**headers, **kw.pop("headers", {})})


@pytest.fixture
def cfg(redis_server):
    return config.from_mapping({"REDIS_URL": redis_server.url, "DASHBOARD_PASSWORD": PASSWORD,
                                "HIREFIRE_TOKEN": "h" * 24, "QUEUES": "default,mail"})


@pytest.fixture
def app(r, cfg):
    return make_app(cfg, redis_client=r)


def enqueue(r, queue="default", args=(), name="push", job_id="j1", at=1_700_000_000.0):
    payload = json.dumps({"id": job_id, "name": name, "queue": queue, "args": list(args), "kwargs": {},
                          "enqueued_at": at, "attempts": 0}, separators=(",", ":"))
    r.rpush(K.queue(queue), payload)
    r.sadd(K.queues, queue)
    return payload


def fail(r, job_id, name="boom", etype="ValueError", args=()):
    now_ms = int(r.time()[0]) * 1000
    payload = json.dumps({"id": job_id, "name": name, "queue": "default", "args": list(args), "kwargs": {},
                          "enqueued_at": now_ms / 1000, "attempts": 1})
    rec = {"id": job_id, "name": name, "queue": "default", "payload": payload, "cause": "error", "type": etype,
           "message": f"bad {HOSTILE}", "traceback": "Traceback...", "attempts": 1, "failed_at": now_ms / 1000,
           "history": []}
    r.zadd(K.failed, {job_id: now_ms})
    r.hset(K.failed_data, job_id, json.dumps(rec))
    r.hset(K.job(job_id), mapping={"status": "failed", "name": name, "queue": "default", "attempts": 1})


# --- authentication -------------------------------------------------------------------------------------------

def test_every_page_needs_the_password_and_any_user_name_works(app):
    for auth in (None, basic("wrong"), "Basic !!notbase64", "Bearer x"):
        status, headers, _ = Client(app, auth=auth).get("/")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic"), auth
    for user in ("admin", ""):
        assert Client(app, auth=basic(user=user)).get("/")[0] == 200


def test_without_a_password_or_an_authorize_hook_the_app_refuses_to_build(r, redis_server):
    with pytest.raises(config.ConfigError, match="DASHBOARD_PASSWORD"):
        make_app(config.from_mapping({"REDIS_URL": redis_server.url}), redis_client=r)


def test_the_standalone_command_refuses_to_start_without_a_password(env):
    e = {k: v for k, v in env.items() if k != "DASHBOARD_PASSWORD"}
    res = subprocess.run([sys.executable, "-m", "worker", "web"], env=e, cwd=str(REPO), capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2 and "DASHBOARD_PASSWORD" in res.stderr, (res.stdout, res.stderr)


def test_the_authorize_hook_replaces_basic_auth(r, cfg):
    app = make_app(cfg, redis_client=r, authorize=lambda environ: environ.get("HTTP_X_STAFF") == "yes")
    status, headers, _ = Client(app, auth=None).get("/")
    assert status == 403 and "WWW-Authenticate" not in headers  # the host app said no: no password prompt
    assert Client(app, auth=basic()).get("/")[0] == 403  # the password is not a way around the host's check
    assert Client(app, auth=None).get("/", headers={"X-Staff": "yes"})[0] == 200


def test_no_secret_appears_in_any_page_or_metrics(app, r, cfg):
    enqueue(r)
    fail(r, "f1")
    c = Client(app)
    for path in ("/", "/queues/default", "/failed", "/scheduled", "/periodic", "/metrics", "/jobs/f1", "/?live=1"):
        status, _, text = c.get(path)
        assert status == 200, path
        assert PASSWORD not in text and cfg.hirefire_token not in text, path
    assert PASSWORD not in repr(cfg) and cfg.hirefire_token not in repr(cfg)


# --- state changes: POST + same origin + CSRF token ---------------------------------------------------------

def test_a_state_change_needs_post_same_origin_and_the_token(app, r):
    enqueue(r)
    c = Client(app)
    c.get("/")  # the page sets the CSRF cookie
    assert c.get("/queues/default/pause")[0] == 404  # a GET changes nothing
    assert c.post("/queues/default/pause", {}, same_origin=False)[0] == 403  # no Sec-Fetch-Site, no Origin
    assert c.post("/queues/default/pause", {}, same_origin=False, headers={"Origin": "http://evil.test"})[0] == 403
    assert c.post("/queues/default/pause", {}, same_origin=False,
                  headers={"Sec-Fetch-Site": "cross-site", "Origin": "http://dash.test"})[0] == 403
    assert c.post("/queues/default/pause", {}, token=False)[0] == 403
    assert c.post("/queues/default/pause", {"csrf": "x" * 43}, token=False)[0] == 403
    assert not r.smembers(K.paused)
    status, headers, _ = c.post("/queues/default/pause", {"back": "/"})
    assert status == 303 and r.smembers(K.paused) == {"default"}
    assert c.post("/queues/default/resume", {}, same_origin=False, headers={"Origin": "http://dash.test"})[0] == 303
    assert not r.smembers(K.paused)


def test_read_only_hides_and_refuses_every_action(r, cfg):
    enqueue(r)
    fail(r, "f1")
    for app in (make_app(cfg, redis_client=r, read_only=True),
                make_app(config.from_mapping({"REDIS_URL": cfg.redis_url, "DASHBOARD_PASSWORD": PASSWORD,
                                              "DASHBOARD_READ_ONLY": "1"}), redis_client=r)):
        c = Client(app)
        for path in ("/", "/queues/default", "/failed", "/jobs/f1", "/scheduled"):
            status, _, text = c.get(path)
            assert status == 200 and 'method="post"' not in text and "read-only" in text, path
        for path in ("/queues/default/pause", "/failed/retry", "/failed/delete", "/scheduled/run"):
            assert c.post(path, {"id": "f1"})[0] == 403
        assert r.zcard(K.failed) == 1 and not r.smembers(K.paused)


def test_failed_retry_and_delete_one_selected_and_all_matching_with_confirmation(app, r):
    for i in range(3):
        fail(r, f"a{i}", name="alpha", etype="ValueError")
    fail(r, "b0", name="beta", etype="KeyError")
    c = Client(app)
    status, _, text = c.get("/failed?name=alpha")
    assert status == 200 and "3 of" in text and "b0" not in text
    assert c.get("/failed?type=KeyError")[2].count('name="id" value=') == 1
    assert c.post("/failed/retry", {"id": "a0"})[0] == 303
    assert [json.loads(p)["id"] for p in r.lrange(K.queue("default"), 0, -1)] == ["a0"]
    # all matching: refused without the confirmation step, done after it
    assert c.post("/failed/delete", {"all": "1", "name": "alpha"})[0] == 403
    status, _, text = c.get("/failed/confirm?action=delete&name=alpha")
    assert status == 200 and "Delete all 2 failed job(s) named &#x27;alpha&#x27;?" in text
    assert c.post("/failed/delete", {"all": "1", "confirm": "yes", "name": "alpha", "type": ""})[0] == 303
    assert r.zrange(K.failed, 0, -1) == ["b0"]
    assert c.post("/failed/delete", {"id": ["b0"]})[0] == 303 and r.zcard(K.failed) == 0


def test_scheduled_run_now_and_delete(app, r):
    p1 = json.dumps({"id": "s1", "name": "push", "queue": "mail", "args": [], "kwargs": {}, "enqueued_at": 1})
    p2 = json.dumps({"id": "s2", "name": "push", "queue": "mail", "args": [], "kwargs": {}, "enqueued_at": 1})
    r.zadd(K.scheduled, {p1: 4_000_000_000_000, p2: 4_000_000_000_001})
    c = Client(app)
    status, _, text = c.get("/scheduled")
    assert status == 200 and "s1" in text and "s2" in text
    assert c.post("/scheduled/run", {"payload": p1})[0] == 303
    assert r.lrange(K.queue("mail"), 0, -1) == [p1] and r.llen(K.wake("mail")) == 1
    assert c.post("/scheduled/delete", {"payload": p2})[0] == 303 and r.zcard(K.scheduled) == 0


def test_a_queued_jobs_page_cancels_it_by_post_and_not_in_read_only_mode(app, r, cfg):
    """Issue 24 item 2: the Cancel button (POST + CSRF + same origin), hidden and refused in read-only mode."""
    enqueue(r, job_id="q1")
    r.hset(K.job("q1"), mapping={"status": "queued", "name": "push", "queue": "default"})
    ro = Client(make_app(cfg, redis_client=r, read_only=True))
    assert "/cancel" not in ro.get("/jobs/q1")[2] and ro.post("/jobs/q1/cancel", {})[0] == 403
    c = Client(app)
    assert 'action="/jobs/q1/cancel"' in c.get("/jobs/q1")[2]
    assert c.post("/jobs/q1/cancel", {}, same_origin=False)[0] == 403 and r.llen(K.queue("default")) == 1
    status, headers, _ = c.post("/jobs/q1/cancel", {})
    assert status == 303 and "canceled" in headers["Location"]
    assert r.llen(K.queue("default")) == 0 and r.hget(K.job("q1"), "status") == "canceled"
    status, _, text = c.get("/jobs/q1")
    assert "canceled" in text and "/cancel" not in text
    assert "not%20canceled" in c.post("/jobs/q1/cancel", {})[1]["Location"]


def test_a_reused_job_ids_page_shows_the_new_job_not_the_old_failure(app, r):
    """Issue 24 item 4: an id may be used again once its job ended; after a failure, the failed registry keeps the
    old record, but the job page shows the job now queued under that id, not the old error (found by the helper
    that built own job ids)."""
    fail(r, "again")
    enqueue(r, job_id="again")
    r.hset(K.job("again"), mapping={"status": "queued", "attempts": 0})  # as ENQUEUE writes it for a reused id
    status, _, text = Client(app).get("/jobs/again")
    assert status == 200 and "queued" in text
    assert "bad &lt;img" not in text and "Traceback..." not in text


# --- escaping and headers -------------------------------------------------------------------------------------

def test_a_hostile_argument_name_queue_and_error_show_as_text(app, r):
    enqueue(r, args=[HOSTILE], name=HOSTILE, job_id="h1")
    r.hset(K.job("h1"), mapping={"status": "queued", "name": HOSTILE, "queue": "default"})
    fail(r, "f1", name=HOSTILE, args=[HOSTILE])
    r.rpush(K.queue("default"), HOSTILE)  # not even JSON
    c = Client(app)
    for path in ("/", "/queues/default", "/failed", "/jobs/f1", "/jobs/h1", f"/jobs/{HOSTILE}"):
        status, headers, text = c.get(path)
        assert "<img" not in text, path
        assert path == "/" or "&lt;img src=x onerror=alert(1)&gt;" in text, path
        assert "script-src 'self'" in headers["Content-Security-Policy"], path
        assert "<script>" not in text and " on" + "error=" not in text.replace("&lt;img src=x onerror=", "")


def test_pages_use_no_inline_script_and_serve_their_static_files(app):
    status, headers, text = Client(app).get("/")
    assert re.findall(r"<script[^>]*>", text) == ['<script src="/static/dashboard.js" defer>']
    assert "unsafe-inline" not in headers["Content-Security-Policy"]
    status, headers, js = Client(app, auth=None).get("/static/dashboard.js")
    assert status == 200 and "visibilityState" in js and headers["Content-Type"].startswith("text/javascript")
    assert Client(app, auth=None).get("/static/../app.py")[0] == 404


# --- pages ----------------------------------------------------------------------------------------------------

def test_overview_queue_and_job_pages_show_the_read_model(app, r):
    for i in range(120):
        enqueue(r, args=[i], job_id=f"q{i}")
    c = Client(app)
    status, _, text = c.get("/")
    assert status == 200 and 'data-live="q:default:depth">120<' in text and "Throughput" in text
    status, _, text = c.get("/queues/default?page=3")
    assert "page 3 of 3" in text and "q100" in text and "q99" not in text
    assert c.get("/jobs?id=q5")[1]["Location"] == "/jobs/q5"
    r.hset(K.job("q5"), mapping={"status": "queued", "name": "push", "queue": "default", "enqueued_at": 1.7e12})
    status, _, text = c.get("/jobs/q5")
    assert status == 200 and "<code>[5]</code>" in text and "2023-11-14T22:13:20.000Z" in text
    live = json.loads(c.get("/?live=1")[2])
    assert live["q:default:depth"] == 120 and live["failed"] == 0


def test_a_done_jobs_warning_is_shown_escaped(app, r):
    """A result that was not JSON leaves the job done with a warning (issue 24 item 8); the job page shows it, as
    escaped text (the note of issue 24 named it missing from the page and from `job ID`)."""
    r.hset(K.job("w1"), mapping={"status": "done", "name": "push", "queue": "default", "enqueued_at": 1.7e12,
                                 "result": '{"unserializable": "set", "repr": "{3}"}',
                                 "warning": "result_unserializable: <set> is not JSON"})
    status, _, text = Client(app).get("/jobs/w1")
    assert status == 200 and "result_unserializable: &lt;set&gt; is not JSON" in text and "<set>" not in text


def test_metrics_is_prometheus_text(app, r):
    enqueue(r, queue='we"ird')
    fail(r, "f1")
    status, headers, text = Client(app).get("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert 'worker_queue_depth{queue="we\\"ird"} 1' in text and "worker_failed_jobs 1" in text
    assert "# TYPE worker_jobs_processed_total counter" in text
    for line in text.splitlines():
        assert line.startswith("#") or re.fullmatch(r'[a-z_]+(\{queue="(\\.|[^"\\])*"\})? [0-9.e+-]+', line), line


def test_hirefire_needs_its_token_not_the_password_and_counts_due_work(app, r, cfg):
    enqueue(r, job_id="a")
    enqueue(r, queue="mail", job_id="b")
    enqueue(r, queue="other", job_id="c")  # not served by QUEUES=default,mail
    r.zadd(K.scheduled, {"due": 1000, "later": 4_000_000_000_000})
    anon = Client(app, auth=None)
    assert anon.get("/hirefire/wrong/info")[0] == 404
    status, headers, text = anon.get(f"/hirefire/{cfg.hirefire_token}/info")
    assert status == 200 and json.loads(text) == [{"name": "worker", "value": 3}]
    assert headers["Content-Type"] == "application/json"


# --- mounts ---------------------------------------------------------------------------------------------------

def test_plain_wsgi_prefix_mount_links_stay_under_the_prefix(app, r):
    enqueue(r)

    def host(environ, start_response):  # the simplest dispatcher: /jobs/* goes to the dashboard
        path = environ["PATH_INFO"]
        if path.startswith("/ops/jobs"):
            environ = dict(environ, SCRIPT_NAME="/ops/jobs", PATH_INFO=path[len("/ops/jobs"):] or "/")
            return app(environ, start_response)
        start_response("404 Not Found", [])
        return [b""]
    c = Client(host)
    status, _, text = c.get("/ops/jobs/")
    assert status == 200 and 'href="/ops/jobs/queues/default"' in text and 'src="/ops/jobs/static/dashboard.js"' in text
    assert c.post("/ops/jobs/queues/default/pause", {"back": "/"})[1]["Location"].startswith("/ops/jobs/?")


def test_flask_dispatcher_middleware_mount(app, r):
    flask = pytest.importorskip("flask")
    from werkzeug.middleware.dispatcher import DispatcherMiddleware
    from werkzeug.test import Client as WClient
    host = flask.Flask("host")
    host.wsgi_app = DispatcherMiddleware(host.wsgi_app, {"/admin/jobs": app})
    enqueue(r)
    res = WClient(host).get("/admin/jobs/queues/default", headers={"Authorization": basic()})
    assert res.status_code == 200 and 'href="/admin/jobs/failed"' in res.get_data(as_text=True)
    assert WClient(host).get("/admin/jobs/").status_code == 401


def test_django_url_include_mount(app, r, tmp_path):
    pytest.importorskip("django")
    enqueue(r)
    script = f"""
import django, json
from django.conf import settings
settings.configure(ROOT_URLCONF=__name__, ALLOWED_HOSTS=["testserver"], SECRET_KEY="x", MIDDLEWARE=[])
django.setup()
from django.urls import include, path
from worker import config
from worker.web import make_app
from worker.web.django import urls
dash = make_app(config.from_mapping({{"REDIS_URL": "{app.cfg.redis_url}"}}),
                authorize=lambda environ: environ["worker.web.request"].headers.get("X-Staff") == "yes")
urlpatterns = [path("ops/jobs/", include(urls(dash)))]
from django.test import Client
c = Client()
assert c.get("/ops/jobs/").status_code == 403
res = c.get("/ops/jobs/queues/default", HTTP_X_STAFF="yes")
body = res.content.decode()
assert res.status_code == 200 and 'href="/ops/jobs/failed"' in body, (res.status_code, body[:500])
c.get("/ops/jobs/", HTTP_X_STAFF="yes")
from urllib.parse import urlencode
form = urlencode({{"csrf": c.cookies["worker_dashboard_csrf"].value, "back": "/"}})  # what a browser's form sends
res = c.post("/ops/jobs/queues/default/pause", form, content_type="application/x-www-form-urlencoded",
             HTTP_X_STAFF="yes", HTTP_SEC_FETCH_SITE="same-origin")
assert res.status_code == 303 and res["Location"].startswith("/ops/jobs/"), (res.status_code, res.content)
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", script], cwd=str(REPO), capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    assert redis.Redis.from_url(app.cfg.redis_url, decode_responses=True).smembers(K.paused) == {"default"}
