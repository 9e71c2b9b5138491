"""The README's configuration table, app.json and the variables config.py reads must list the same names."""
import json
import re

from tests.conftest import REPO

PLATFORM_SET = {"REDIS_URL", "DYNO", "PORT"}  # set by the add-on / the dyno manager, so not declared in app.json


def readme_env_table() -> set:
    text = (REPO / "README.md").read_text()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([A-Z_]+)` \|", section, re.M))


def config_vars() -> set:
    src = (REPO / "worker" / "config.py").read_text()
    return set(re.findall(r"""env(?:\.get)?\(\s*["']([A-Z_]+)["']""", src)) | \
        set(re.findall(r"""_(?:number|bool|list|secret)\(env, ["']([A-Z_]+)["']""", src))


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


def _readme() -> str:
    return (REPO / "README.md").read_text()


def test_readme_is_a_users_guide_in_order():
    text = _readme()
    # Every section is user material (install, jobs, results, hooks, tests, long and periodic jobs, deploy, operate);
    # design notes, benchmarks and contributor commands live in docs/.
    assert len(text.splitlines()) <= 460, "the README is the user's guide: contributor material goes to docs/"
    order = ["## Two commands", "## Install into an existing app", "## Writing jobs", "## Deploying and scaling",
             "## Running locally", "## Operating", "## Configuration", "## Coming from", "## Periodic jobs"]
    positions = [text.find(h) for h in order]
    assert -1 not in positions, [h for h, p in zip(order, positions) if p == -1]
    assert positions == sorted(positions), "README sections out of order"
    head = text.split("## Install", 1)[0]
    assert "at-least-once" in head and "more than once" in head, "the guarantee must be stated at the top"


def test_readme_links_point_at_files_that_exist():
    for target in re.findall(r"\]\(((?!https?:|#)[^)#\s]+)", _readme()):
        assert (REPO / target).exists(), target


def test_readme_states_platform_behaviour_as_it_is():
    text = _readme()
    assert "nothing is ever lost" not in text.lower() and "no job lost" not in text.lower()
    assert "--dyno worker" not in text, "--dyno matches a dyno name; users want --process-type worker"
    assert "--process-type worker" in text
    assert "heroku local" in text and "never escalates to SIGKILL" in text
    assert "only once some process of the Procfile has exited" in text  # honcho's KILL_WAIT
    assert "python -m worker enqueue" in text.split("## Periodic jobs", 1)[1]
