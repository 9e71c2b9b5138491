"""The README's configuration table, app.json and the variables config.py reads must list the same names."""
import json
import re

from tests.conftest import REPO

PLATFORM_SET = {"REDIS_URL", "DYNO"}  # set by the add-on / the dyno manager, so not declared in app.json


def readme_env_table() -> set:
    text = (REPO / "README.md").read_text()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([A-Z_]+)` \|", section, re.M))


def config_vars() -> set:
    src = (REPO / "worker" / "config.py").read_text()
    return set(re.findall(r"""env(?:\.get)?\(\s*["']([A-Z_]+)["']""", src)) | \
        set(re.findall(r"""_(?:number|bool|list)\(env, ["']([A-Z_]+)["']""", src))


def test_readme_table_matches_app_json_and_config():
    app_env = set(json.loads((REPO / "app.json").read_text())["env"])
    readme = readme_env_table()
    assert readme, "no configuration table found in the README"
    assert readme - PLATFORM_SET == app_env, (readme ^ app_env) - PLATFORM_SET
    assert readme == config_vars(), readme ^ config_vars()


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    text = (REPO / "README.md").read_text()
    assert "make demo" in text and "make test" in text
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test(\s|$)", ci, re.M)
    assert re.search(r"^make test-min(\s|$)", ci, re.M), "CI must also test the declared minimum versions"
