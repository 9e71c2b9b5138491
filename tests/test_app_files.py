"""The files Heroku reads: runtime.txt, app.json (Heroku Button / review apps), requirements.txt, Procfile."""
from __future__ import annotations

import json
import re

import pytest

from tests.conftest import REPO
from worker import config

# Variables the Heroku platform or an add-on sets by itself: app.json must not declare them (an env entry for
# REDIS_URL would collide with the config var the heroku-redis add-on creates).
PLATFORM_VARS = {"REDIS_URL", "DYNO", "PORT"}


def config_variables() -> set:
    """Every variable ``worker.config.from_mapping`` reads, taken from its source so a new one cannot be missed."""
    source = (REPO / "worker" / "config.py").read_text()
    names = set(re.findall(r"""env\.get\(\s*["']([A-Z][A-Z0-9_]*)["']""", source))
    names |= set(re.findall(r"""\(\s*env\s*,\s*["']([A-Z][A-Z0-9_]*)["']""", source))
    assert {"REDIS_URL", "QUEUES", "TERM_TIMEOUT", "SHUTDOWN_WINDOW"} <= names, names  # the scan still works
    return names


@pytest.fixture(scope="module")
def app():
    path = REPO / "app.json"
    assert path.exists(), "app.json is missing"
    return json.loads(path.read_text())


def test_runtime_txt():
    assert re.match(r"^python-3\.\d+(\.\d+)?$", (REPO / "runtime.txt").read_text().strip())


def test_app_json_metadata(app):
    assert isinstance(app.get("name"), str) and 0 < len(app["name"]) <= 30, app.get("name")
    assert isinstance(app.get("description"), str) and app["description"].strip()
    assert len(app["description"]) <= 140, len(app["description"])  # Heroku Button's limit (issue 21 item 10)
    keywords = app.get("keywords")
    assert isinstance(keywords, list) and keywords and all(isinstance(k, str) and k for k in keywords)


def test_app_json_env_documents_the_configuration(app):
    env = app.get("env")
    assert isinstance(env, dict) and env
    known = config_variables()
    assert set(env) <= known, f"unknown variables in app.json: {sorted(set(env) - known)}"
    missing = known - PLATFORM_VARS - set(env)
    assert not missing, f"configuration variables not in app.json: {sorted(missing)}"
    for name, spec in env.items():
        assert isinstance(spec, dict), f"{name}: expected an object with a description and a value"
        assert isinstance(spec.get("description"), str) and spec["description"].strip(), f"{name}: no description"
        assert isinstance(spec.get("value"), str), f"{name}: no default value (a string)"


def test_app_json_env_defaults_are_valid_config(app):
    """Deploying with the button's defaults must give a worker that starts (no config error at boot)."""
    values = {name: spec["value"] for name, spec in app["env"].items() if isinstance(spec, dict)}
    cfg = config.from_mapping(values)
    assert cfg.term_grace + cfg.term_timeout <= cfg.shutdown_window - 1.0


def test_app_json_leaves_platform_variables_alone(app):
    assert not PLATFORM_VARS & set(app.get("env", {})), "REDIS_URL/DYNO are set by the add-on / platform"


# Dyno sizes on which `heroku ps:scale worker=N` accepts N > 1 (Eco and Basic allow one dyno per process type).
SCALABLE_SIZES = {"standard-1x", "standard-2x", "performance-m", "performance-l", "performance-l-ram",
                  "performance-xl", "performance-2xl", "private-s", "private-m", "private-l", "shield-s", "shield-m",
                  "shield-l"}


def test_app_json_formation_addon_buildpack(app):
    worker = app.get("formation", {}).get("worker")
    assert isinstance(worker, dict) and isinstance(worker.get("quantity"), int) and worker["quantity"] >= 1
    assert str(worker.get("size", "")).lower() in SCALABLE_SIZES, \
        f"formation.worker.size={worker.get('size')!r}: ps:scale worker=N needs standard-1x or larger"
    plans = [a if isinstance(a, str) else a.get("plan", "") for a in app.get("addons", [])]
    assert any(p == "heroku-redis" or p.startswith("heroku-redis:") for p in plans), plans
    assert {"url": "heroku/python"} in app.get("buildpacks", []), app.get("buildpacks")


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield k
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


# URLs the project owns and may put in app.json (a repository, website, logo, success_url). None yet: the project
# has no public home, and an invented one sends Heroku Button users to a 404.
OWNED_URL_PREFIXES: tuple = ()


def test_app_json_holds_no_url_the_project_does_not_own(app):
    urls = [s for s in _strings(app) if re.search(r"(?i)\b(https?|git|ssh)://|\bgit@|\bwww\.", s)]
    foreign = [u for u in urls if not u.startswith(OWNED_URL_PREFIXES or ("\0",))]
    assert not foreign, f"app.json names URLs the project does not own: {foreign}"
    for key in ("repository", "website", "logo", "success_url"):
        assert key not in app or app[key].startswith(OWNED_URL_PREFIXES or ("\0",)), key


def test_slugignore_keeps_tests_bench_docs_and_images_out_of_the_slug():
    lines = [ln.strip() for ln in (REPO / ".slugignore").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    for folder in ("tests", "bench", "docs"):
        assert folder in lines or f"/{folder}" in lines or f"{folder}/" in lines or f"/{folder}/" in lines, folder
    assert "*.png" in lines
    assert not [ln for ln in lines if ln.startswith("!")], "Heroku's .slugignore has no ! negations"
    needed = ("worker", "Procfile", "requirements.txt", "runtime.txt")
    assert not [ln for ln in lines if ln.strip("/").split("/")[0] in needed or ln in ("*", "*.py", "*.txt")], lines


def test_requirements_only_redis_and_dotenv_with_bounds():
    reqs = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$", line)
        assert m, line
        reqs[m.group(1).lower().replace("_", "-")] = [s.strip() for s in m.group(2).split(",") if s.strip()]
    assert set(reqs) == {"redis", "python-dotenv"}, reqs
    for name, specs in reqs.items():
        ops = set()
        for spec in specs:
            op = re.match(r"^(~=|==|>=|<=|!=|>|<)\s*\d", spec)
            assert op, f"{name}: not a version specifier: {spec!r}"
            ops.add(op.group(1))
        assert ops & {">=", ">", "~=", "=="}, f"{name}: no lower bound in {specs}"
        assert ops & {"<", "<=", "~=", "=="}, f"{name}: no upper bound in {specs}"


def test_procfile_runs_the_worker():
    lines = [ln for ln in (REPO / "Procfile").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert "worker: python -m worker" in lines, lines


@pytest.mark.timeout(60)
def test_make_redis_listens_on_loopback_only_and_make_redis_stop_ends_it(tmp_path):
    """Issue 21 item 9: `make redis` started a server bound to every interface, with no way to stop it."""
    import shutil
    import subprocess

    import redis as redis_py

    from tests.support import free_port
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    port = free_port()
    make = ["make", "--no-print-directory", "-C", str(REPO), f"REDIS_PORT={port}"]
    started = subprocess.run([*make, "redis"], capture_output=True, text=True, timeout=30)
    client = redis_py.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1, decode_responses=True)
    try:
        assert started.returncode == 0, started.stderr
        assert client.config_get("bind")["bind"].split() == ["127.0.0.1"]
        assert "make redis-stop" in started.stdout
    finally:
        stopped = subprocess.run([*make, "redis-stop"], capture_output=True, text=True, timeout=30)
    assert stopped.returncode == 0, stopped.stderr
    with pytest.raises(redis_py.ConnectionError):
        client.ping()
    assert not (REPO / f".redis-{port}.pid").exists()
