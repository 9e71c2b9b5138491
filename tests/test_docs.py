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
    assert re.search(r"^make dist(\s|$)", ci, re.M), "CI must build the release and check it with twine"


def test_changelog_has_this_release_and_the_version_lives_in_one_place():
    """Issue 21 item 10: keep-a-changelog form with the current version; pyproject reads worker.__version__."""
    import worker
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog and "keepachangelog.com" in changelog
    assert re.search(rf"^## \[{re.escape(worker.__version__)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.M)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'version = {attr = "worker.__version__"}' in pyproject
    assert not re.search(r"^version\s*=\s*\"", pyproject, re.M)  # no literal version string


def _readme() -> str:
    return (REPO / "README.md").read_text()


def test_readme_is_a_users_guide_in_order():
    """Issue 21 item 11: it opens with what it is and how to install it into an app, has a table of contents and at
    most 250 lines; contributor material lives in docs/contributing.md, details in docs/user-guide.md and
    docs/operations.md."""
    text = _readme()
    assert len(text.splitlines()) <= 250, f"README has {len(text.splitlines())} lines: move details to docs/"
    order = ["## Contents", "## Install into an existing app", "## Writing jobs", "## Deploying and scaling",
             "## Running locally", "## Operating", "## Configuration", "## Coming from", "## Periodic jobs"]
    positions = [text.find(h) for h in order]
    assert -1 not in positions, [h for h, p in zip(order, positions) if p == -1]
    assert positions == sorted(positions), "README sections out of order"
    head = text.split("## Contents", 1)[0]
    assert "at-least-once" in head and "more than once" in head, "the guarantee must be stated at the top"
    assert "make test" not in head and "make demo" not in head, "contributor commands do not open the README"
    install = text.split("## Install into an existing app", 1)[1].split("\n## ", 1)[0]
    assert install.lstrip().startswith("**First: an app with its own top-level `worker.py`"), install[:200]
    assert "heroku-fork-worker" in install and "<host>" not in text and "rev-parse HEAD" in install
    coming = text.split("## Coming from", 1)[1].split("\n## ", 1)[0]
    assert "worker.py" in coming.split("|", 1)[0], "Coming from RQ leads with the worker.py rename"


DOCS = ["README.md", "CHANGELOG.md", "docs/user-guide.md", "docs/operations.md", "docs/contributing.md",
        "docs/design.md", "docs/performance.md", "docs/testing.md"]


def _anchors(path) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped (but - and _), spaces to hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    out = set()
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        out.add(slug)
    return out


def test_every_relative_link_and_anchor_in_the_docs_resolves():
    """Every link in the README and docs/ to a file of this repository points at a file that exists, and every
    #anchor at a heading of its target (issue 21 item 11)."""
    checked = 0
    for doc in DOCS:
        source = REPO / doc
        text = re.sub(r"```.*?```", "", source.read_text(), flags=re.S)
        for target in re.findall(r"\]\(((?!https?:|mailto:)[^)\s]+)\)", text):
            path, _, anchor = target.partition("#")
            dest = (source.parent / path).resolve() if path else source
            assert dest.exists(), f"{doc}: link to missing {target}"
            if anchor and dest.suffix == ".md":
                assert anchor in _anchors(dest), f"{doc}: no heading for #{anchor} in {dest.name}"
            checked += 1
    assert checked > 30, checked  # the scan still finds the links


def test_readme_states_platform_behaviour_as_it_is():
    text = _readme()
    assert "nothing is ever lost" not in text.lower() and "no job lost" not in text.lower()
    assert "--dyno worker" not in text, "--dyno matches a dyno name; users want --process-type worker"
    assert "--process-type worker" in text
    assert "heroku local" in text and "never escalates to SIGKILL" in text
    assert "only once some process of the Procfile has exited" in text  # honcho's KILL_WAIT
    assert "python -m worker enqueue" in text.split("## Periodic jobs", 1)[1]


def test_running_locally_names_only_what_a_fresh_clone_has():
    """Issue 21 item 9: the README's "Running locally" works verbatim on a fresh clone: its venv is activated, honcho
    is installed into it, every file and make target it uses exists, heroku local's SIGTERM behaviour is said."""
    text = _readme()
    section = text.split("## Running locally", 1)[1].split("\n## ", 1)[0]
    assert ". .venv/bin/activate" in section and "pip install" in section and "honcho" in section.split("```")[1]
    makefile = (REPO / "Makefile").read_text()
    for target in set(re.findall(r"`make ([a-z][a-z-]*)|^make ([a-z][a-z-]*)", text, re.M)) - {("", "")}:
        target = target[0] or target[1]
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"README names `make {target}`: no such target"
    for name in re.findall(r"(?:cp|-r) ([.\w-]+\.(?:example|txt))", section):
        assert (REPO / name).exists(), name
    assert "heroku local" in section and "never escalates to SIGKILL" in section
