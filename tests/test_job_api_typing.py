"""Item 7 of issue 12: ``@job`` keeps the function's signature for type checkers and types ``.enqueue`` from it.

mypy runs on two small files in tests/typed/: every line of ok_jobs.py type-checks under --strict; each line of
bad_jobs.py marked ``# E`` is reported (and nothing else). The worker package is followed silently (its own
internals are not what is checked here), as it would be when installed (it ships ``py.typed``).
"""
from __future__ import annotations

import inspect
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

TYPED = REPO / "tests" / "typed"


def _mypy(*args):
    pytest.importorskip("mypy", reason="mypy is in requirements-dev.txt")
    return subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir=/dev/null",
                           "--follow-imports=silent", "--python-version=3.11", *args],
                          cwd=str(TYPED), capture_output=True, text=True, timeout=180)


@pytest.mark.timeout(200)
def test_correct_calls_type_check_strictly():
    out = _mypy("--strict", "ok_jobs.py")
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.timeout(200)
def test_wrong_enqueue_arguments_are_reported():
    out = _mypy("bad_jobs.py")
    text = (TYPED / "bad_jobs.py").read_text().splitlines()
    expected = {i + 1 for i, line in enumerate(text) if re.search(r"#\s*E:", line)}
    reported = {int(m.group(1)) for m in re.finditer(r"^bad_jobs\.py:(\d+): error", out.stdout, re.M)}
    assert expected and reported == expected, out.stdout + out.stderr


def test_runtime_behaviour_is_unchanged():
    """The decorator still returns the very function, with its signature and the three enqueue attributes."""
    from worker import jobs

    def plain(x: int, y: int = 1) -> int:
        return x + y

    decorated = jobs.job(name="typing_plain")(plain)
    assert decorated is plain and decorated(1, y=2) == 3
    assert list(inspect.signature(decorated).parameters) == ["x", "y"]
    assert decorated.job_name == "typing_plain"
    assert all(callable(getattr(decorated, a)) for a in ("enqueue", "enqueue_in", "enqueue_at"))
    bare = jobs.job(plain)
    assert bare is plain


def test_the_wheel_ships_py_typed():
    assert (REPO / "worker" / "py.typed").exists()
    assert '"py.typed"' in (REPO / "pyproject.toml").read_text()
