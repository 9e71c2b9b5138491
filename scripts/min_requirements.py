"""Print the package's dependencies pinned to their declared minimums (``redis>=5.3,<9`` -> ``redis==5.3``).

Used by ``make test-min`` as a pip constraints file, so the floors in pyproject.toml are the versions tested.
"""
import re
import sys
import tomllib
from pathlib import Path

pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
for dep in deps:
    m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*[^;]*?>=\s*([0-9][0-9A-Za-z.]*)", dep)
    if not m:
        sys.exit(f"min_requirements: {dep!r} has no >= floor")
    print(f"{m.group(1)}=={m.group(2)}")
