"""The distribution as a user gets it: build the wheel, install it into a fresh venv outside the repo, run a job.

Offline and quick (~10 s): the wheel is built with the setuptools of the running venv (``--no-build-isolation``;
requirements-dev.txt asks for it) from a copy of the sources in a temp dir. The fresh venv gets its dependencies
by copying the running venv's installed ``redis`` and ``python-dotenv`` (and what they need on this interpreter),
their files as pip wrote them; then the wheel is installed with ``--no-index`` *with* dependency resolution, so pip
checks the wheel's ``Requires-Dist`` against those versions. Under ``make test-min`` they are the
declared minimums. Nothing is imported from the repo: no PYTHONPATH, cwd outside the repo.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.support import CONFIG_VARS

pytestmark = [pytest.mark.package, pytest.mark.timeout(240)]

DEPENDENCIES = ("redis", "python-dotenv")


def _run(args, timeout=120, **kw):
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def _clean_env(**extra):
    """The environment of a user's shell: none of the suite's or the runtime's variables, no PYTHONPATH."""
    drop = set(CONFIG_VARS) | {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def _setuptools_can_build() -> bool:
    try:
        major = int(md.version("setuptools").split(".")[0])
    except md.PackageNotFoundError:
        return False
    return major >= 77


def _runtime_closure(names) -> list:
    """The distributions ``names`` need on this interpreter, transitively (redis needs async-timeout on Python
    before 3.11.3, Debian 12's 3.11.2 included)."""
    from packaging.requirements import Requirement  # pytest depends on packaging
    seen, todo = [], list(names)
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.append(key)
        for spec in md.distribution(name).requires or ():
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _copy_distribution(name: str, site_packages: Path):
    """Copy an installed distribution's files (package and dist-info) into another venv's site-packages."""
    dist = md.distribution(name)
    for rel in dist.files or ():
        if rel.parts and rel.parts[0] == "..":  # console scripts in bin/: not needed
            continue
        src = Path(dist.locate_file(rel))
        if src.is_file() and "__pycache__" not in rel.parts:
            dst = site_packages / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of what the sdist/git checkout holds (pyproject, README, LICENSE, worker/)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "worker", src / "worker", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    isolation = ["--no-build-isolation"] if _setuptools_can_build() else []  # else: fetch setuptools from the index
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q", *isolation,
          "-w", out, src], timeout=180)
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv (no pip of its own: the running pip installs into it with --python) holding the wheel."""
    root = tmp_path_factory.mktemp("venv")
    assert REPO not in root.parents
    _run([sys.executable, "-m", "venv", "--without-pip", root / "venv"])
    python = root / "venv" / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        env=_clean_env()).stdout.strip())
    for name in _runtime_closure(DEPENDENCIES):
        _copy_distribution(name, purelib)
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--disable-pip-version-check",
          "-q", wheel], env=_clean_env(), timeout=180)
    return python


def test_wheel_holds_the_worker_package_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    dist_info = [t for t in top if t.endswith(".dist-info")]
    assert len(dist_info) == 1 and top - set(dist_info) == {"worker"}, sorted(top)
    assert "worker/__main__.py" in names and "worker/sample.py" in names
    for asset in ("worker/web/templates/layout.html", "worker/web/static/dashboard.js", "worker/web/static/dashboard.css"):
        assert asset in names, f"the dashboard's {asset} is not in the wheel"
    assert not [n for n in names if n.startswith(("tests/", "bench/", "scripts/", "docs/"))]
    assert any(n.endswith("/LICENSE") for n in names), "LICENSE not shipped in the wheel"


def test_wheel_metadata_declares_the_floors(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = sorted(re.findall(r"^Requires-Dist: (.+)$", meta, re.M))
    assert any(re.match(r"redis\s*(\(|)[^;]*>=\s*5\.3", r) for r in requires), requires
    assert any(re.match(r"python-dotenv\s*(\(|)[^;]*>=\s*1\.0", r) for r in requires), requires
    assert len([r for r in requires if "extra ==" not in r]) == 2, requires
    assert [r for r in requires if "extra ==" in r] == ['cronsim<3,>=2.8; extra == "cron"',
                                                        'waitress<4,>=3; extra == "web"'], requires
    assert re.search(r"^Requires-Python: >=3\.\d+", meta, re.M)
    assert re.search(r"^License-Expression: MIT$", meta, re.M)
    version = re.search(r"^Version: (.+)$", meta, re.M).group(1)
    assert version == re.search(r'__version__ = "([^"]+)"', (REPO / "worker" / "__init__.py").read_text()).group(1)


def test_installed_worker_runs_from_outside_the_repo(venv, tmp_path):
    env = _clean_env()
    where = _run([venv, "-c", "import worker; print(worker.__file__)"], cwd=tmp_path, env=env).stdout.strip()
    assert Path(where).resolve().is_relative_to(venv.parent.parent.resolve()), where
    out = _run([venv, "-m", "worker", "--help"], cwd=tmp_path, env=env).stdout
    assert "usage:" in out and "enqueue" in out and "status" in out, out


def test_installed_worker_drains_a_job_in_burst_mode(venv, tmp_path, redis_server):
    """An app of one module outside the repo: enqueue from the command line, then `python -m worker --burst`."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "pkgjobs.py").write_text(
        "from pathlib import Path\n"
        "from worker import job\n\n\n"
        "@job(queue='pkgtest')\n"
        "def write(path, text):\n"
        "    Path(path).write_text(text)\n")
    out = tmp_path / "out.txt"
    env = _clean_env(REDIS_URL=redis_server.url, JOB_MODULES="pkgjobs", QUEUES="pkgtest", KEY_PREFIX="pkgtest",
                     LOG_LEVEL="DEBUG")
    _run([venv, "-m", "worker", "enqueue", "write", "--args", json.dumps([str(out), "done"])], cwd=app, env=env,
         timeout=30)
    drained = _run([venv, "-m", "worker", "--burst"], cwd=app, env=env, timeout=60)
    assert out.read_text() == "done", drained.stdout + drained.stderr
    assert "reason=burst" in drained.stdout + drained.stderr


def test_console_script_runs_the_package_whatever_the_app_directory_holds(venv, tmp_path, redis_server):
    """Issue 21 item 1: an app that follows Heroku's RQ guide has its own top-level worker.py; `python -m worker`
    would run that file (exit 0, a crash-looping dyno). The console script never runs it: beside it, one line naming
    the file and the fix, exit 2; without it, the worker runs and imports JOB_MODULES from the working directory."""
    script = venv.parent / "heroku-fork-worker"
    assert script.exists(), sorted(p.name for p in venv.parent.iterdir())
    app = tmp_path / "app"
    app.mkdir()
    marker = tmp_path / "app-worker-ran"
    (app / "worker.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (app / "appjobs.py").write_text("from pathlib import Path\nfrom worker import job\n\n\n"
                                    "@job(queue='cs')\ndef write(path):\n    Path(path).write_text('done')\n")
    env = _clean_env(REDIS_URL=redis_server.url, JOB_MODULES="appjobs", QUEUES="cs", KEY_PREFIX="cstest")
    refused = subprocess.run([script, "--burst"], cwd=app, env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2, refused
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and str(app / "worker.py") in lines[0] and "rename" in lines[0], refused.stderr
    assert not marker.exists(), "the app's worker.py was run"
    (app / "worker.py").rename(app / "rq_worker.py")
    out = tmp_path / "out.txt"
    _run([script, "enqueue", "write", "--args", json.dumps([str(out)])], cwd=app, env=env, timeout=30)
    drained = _run([script, "--burst"], cwd=app, env=env, timeout=60)
    assert out.read_text() == "done", drained.stdout + drained.stderr


def _requirement_map(lines) -> dict:
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$", line)
            out[m.group(1).lower().replace("_", "-")] = sorted(s.replace(" ", "") for s in m.group(2).split(","))
    return out


def test_requirements_txt_and_pyproject_declare_the_same_bounds():
    """Heroku installs requirements.txt, pip installs the package's metadata: the floors must not drift apart."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = _requirement_map(project["dependencies"])
    assert set(declared) == set(DEPENDENCIES), declared
    assert _requirement_map((REPO / "requirements.txt").read_text().splitlines()) == declared
    assert "redis" in declared and ">=5.3" in declared["redis"], declared  # ExponentialWithJitterBackoff etc.
    assert project["requires-python"].startswith(">=3.")


def test_license_is_mit():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text
