"""Configuration: validation before any connection, derived shutdown defaults, `.env` loading, no leaked password
(redaction of URLs parsers misread), a Unix-socket REDIS_URL, and the warning about a Redis that evicts keys.

A bad value must stop `python -m worker` (and every other command) with exit 2 and one stderr line naming the
variable, the value and what is accepted - and it must do so before touching Redis, which we prove with the test
server's own connection counter.
"""
from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import PYTHON, free_port
from tests.support import make_broker, wait_until
from worker import config
from worker.config import ConfigError, redact_url

COMMANDS = [pytest.param([], id="run"), pytest.param(["enqueue", "noop"], id="enqueue")]

# (environment overrides, substrings the one-line message must contain: variable, bad value, what is accepted)
BAD_VALUES = [
    pytest.param({"TERM_TIMEOUT": "abc"}, ["TERM_TIMEOUT", "abc", "number"], id="term-timeout-text"),
    pytest.param({"TERM_TIMEOUT": "-1"}, ["TERM_TIMEOUT", "-1", ">= 0"], id="term-timeout-negative"),
    pytest.param({"TERM_TIMEOUT": "9.5", "SHUTDOWN_WINDOW": "10"},
                 ["TERM_TIMEOUT", "9.5", "SHUTDOWN_WINDOW", "<="], id="term-timeout-over-window"),
    pytest.param({"LOG_LEVEL": "LOUD"}, ["LOG_LEVEL", "LOUD", "DEBUG", "INFO", "WARNING", "ERROR"], id="log-level"),
    pytest.param({"REDIS_URL": "http://x"}, ["REDIS_URL", "http://x", "redis://"], id="redis-url-scheme"),
    pytest.param({"REDIS_URL": "redis://host:notaport"}, ["REDIS_URL", "redis://host:notaport", "redis://"],
                 id="redis-url-port"),
    pytest.param({"JOB_MODULES": "worker.sample,no_such_module_xyz"},
                 ["JOB_MODULES", "no_such_module_xyz", "importable"], id="job-modules-missing"),
    pytest.param({"QUEUES": "a,,b"}, ["QUEUES", "a,,b", "empty"], id="queues-empty-name"),
    pytest.param({"QUEUES": "*,a"}, ["QUEUES", "*,a", "alone"], id="queues-star-and-name"),
    # issue 21 item 2: on a dyno there is no Redis on localhost; the default would log redis.unavailable for ever
    pytest.param({"DYNO": "worker.1", "REDIS_URL": ""}, ["REDIS_URL", "worker.1", "heroku-redis"],
                 id="dyno-without-redis-url"),
    # issue 27 item 10: a TTL so long that PEXPIRE would fail in a script, after the claim left the processing list
    pytest.param({"RESULT_TTL": "9e15"}, ["RESULT_TTL", "9e15", "<="], id="result-ttl-too-long"),
    pytest.param({"FAILED_TTL": "9e15"}, ["FAILED_TTL", "9e15", "<="], id="failed-ttl-too-long"),
    pytest.param({"UNKNOWN_JOB_GRACE": "-1"}, ["UNKNOWN_JOB_GRACE", "-1", ">= 0"], id="unknown-job-grace"),
]


def connections(r) -> int:
    """Connections the test server has ever accepted (our own client's is already open, so it does not count)."""
    return int(r.info("stats")["total_connections_received"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("overrides,expected", BAD_VALUES)
def test_bad_value_exits_2_with_one_line_and_no_connection(r, cli, command, overrides, expected):
    before = connections(r)
    res = cli(*command, **overrides)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip("\n").splitlines()
    assert len(lines) == 1, res.stderr
    for part in expected:
        assert part in lines[0], f"{part!r} missing from {lines[0]!r}"
    assert res.stdout == ""
    # Where REDIS_URL is still the test server's, it must not have seen a single new client.
    assert connections(r) == before


@pytest.mark.timeout(30)
def test_connection_probe_sees_a_valid_command(r, cli):
    """Control for the test above: the counter does move when the CLI really talks to the server."""
    before = connections(r)
    res = cli("enqueue", "noop")
    assert res.returncode == 0, res.stderr
    assert connections(r) > before


@pytest.mark.timeout(30)
def test_bad_value_fails_fast_even_when_nothing_listens(cli):
    """With REDIS_URL on a dead port, a bad value still gives the config error (exit 2), not a Redis error."""
    res = cli("enqueue", "noop", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", TERM_TIMEOUT="abc")
    assert res.returncode == 2, res.stderr
    assert "TERM_TIMEOUT" in res.stderr and "Redis" not in res.stderr


# --- from_mapping: defaults derived from the shutdown window ---

def test_defaults():
    cfg = config.from_mapping({})
    assert cfg.shutdown_window == 10.0
    assert cfg.term_grace == 0.0
    assert cfg.term_timeout == pytest.approx(8.5)
    assert cfg.queues == ("default",)
    assert cfg.log_level == "INFO"
    assert cfg.hard_exit_after == pytest.approx(9.5)


@pytest.mark.parametrize("env,timeout", [
    ({"SHUTDOWN_WINDOW": "30"}, 28.5),
    ({"TERM_GRACE": "2"}, 6.5),                              # grace comes out of the default budget
    ({"SHUTDOWN_WINDOW": "30", "TERM_GRACE": "5"}, 23.5),
    ({"SHUTDOWN_WINDOW": "10", "TERM_TIMEOUT": "9"}, 9.0),   # exactly window - 1: the largest allowed
    ({"TERM_TIMEOUT": " 3 "}, 3.0),
])
def test_term_timeout_derivation(env, timeout):
    assert config.from_mapping(env).term_timeout == pytest.approx(timeout)


@pytest.mark.parametrize("env", [
    {"TERM_TIMEOUT": "9.5", "SHUTDOWN_WINDOW": "10"},
    {"TERM_GRACE": "5", "TERM_TIMEOUT": "4.5"},
    {"SHUTDOWN_WINDOW": "30", "TERM_TIMEOUT": "29.5"},
])
def test_budget_over_window_refused(env):
    with pytest.raises(ConfigError) as err:
        config.from_mapping(env)
    assert "TERM_TIMEOUT" in str(err.value) and "\n" not in str(err.value)


# --- .env: read from the working directory, the real environment wins ---

def run_in(cwd, env, *args, drop=(), **overrides):
    e = {k: v for k, v in env.items() if k not in drop}
    e.update(overrides)
    return subprocess.run([PYTHON, "-m", "worker", *args], env=e, cwd=str(cwd), capture_output=True, text=True,
                          timeout=30)


@pytest.mark.timeout(60)
def test_dotenv_is_read_and_environment_wins(r, env, tmp_path):
    (tmp_path / ".env").write_text("QUEUES=from_dotenv\nLOG_LEVEL=INFO\n")
    only_dotenv = run_in(tmp_path, env, "--burst", drop=("QUEUES", "LOG_LEVEL"))
    assert only_dotenv.returncode == 0, only_dotenv.stderr
    assert "queues=from_dotenv" in only_dotenv.stdout
    both = run_in(tmp_path, env, "--burst", drop=("LOG_LEVEL",), QUEUES="from_env")
    assert both.returncode == 0, both.stderr
    assert "queues=from_env" in both.stdout and "from_dotenv" not in both.stdout


@pytest.mark.timeout(60)
def test_bad_dotenv_value_is_reported_unless_environment_overrides_it(r, env, tmp_path):
    (tmp_path / ".env").write_text("LOG_LEVEL=LOUD\n")
    res = run_in(tmp_path, env, "enqueue", "noop", drop=("LOG_LEVEL",))
    assert res.returncode == 2 and "LOG_LEVEL" in res.stderr and "LOUD" in res.stderr, res.stderr
    res = run_in(tmp_path, env, "enqueue", "noop", LOG_LEVEL="INFO")
    assert res.returncode == 0, res.stderr


# --- the Redis password never reaches stdout/stderr ---

SECRET = "s3cretPW-core"


@pytest.fixture
def acl_user(r):
    """A user with a password on the test server, so a URL carrying a password really connects."""
    r.execute_command("ACL", "SETUSER", "pwtester", "on", f">{SECRET}", "~*", "&*", "+@all")
    yield "pwtester"
    r.execute_command("ACL", "DELUSER", "pwtester")


@pytest.mark.parametrize("url", [f"redis://:{SECRET}@host:notaport", f"http://user:{SECRET}@x",
                                 f"redis://user:{SECRET}@host/notanumber"])
def test_password_not_in_bad_url_message(cli, url):
    res = cli("enqueue", "noop", REDIS_URL=url)
    assert res.returncode == 2 and "REDIS_URL" in res.stderr, res.stderr
    assert SECRET not in res.stdout + res.stderr


def test_password_not_in_other_config_error(cli, redis_server):
    res = cli(REDIS_URL=f"redis://u:{SECRET}@127.0.0.1:{redis_server.port}/0", LOG_LEVEL="LOUD")
    assert res.returncode == 2
    assert SECRET not in res.stdout + res.stderr


@pytest.mark.timeout(60)
def test_password_not_in_worker_start_line(r, cli, redis_server, acl_user):
    res = cli("--burst", REDIS_URL=f"redis://{acl_user}:{SECRET}@127.0.0.1:{redis_server.port}/0")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "event=worker.start" in res.stdout and "redis=" in res.stdout
    assert SECRET not in res.stdout + res.stderr


@pytest.mark.timeout(60)
def test_password_not_in_unreachable_redis_messages(cli, spawn):
    url = f"redis://u:{SECRET}@127.0.0.1:{free_port()}/0"
    res = cli("enqueue", "noop", REDIS_URL=url)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Redis" in res.stderr and SECRET not in res.stdout + res.stderr
    w = spawn(REDIS_URL=url)
    w.wait_for(r"event=redis\.unavailable", timeout=30)
    assert SECRET not in w.output


# --- an error inside a job module: where it is, then the one-line summary (issue 21 item 4) ---

@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", COMMANDS)
def test_an_error_inside_a_job_module_shows_its_file_and_line_then_one_line(env, tmp_path, command):
    """Issue 21 item 4: `cannot import 'buggy' (NameError ...)` had no file or line and said "expected importable
    module paths". The traceback's last frames (file:line, the app's own) come first, the summary last; exit 2."""
    (tmp_path / "helper_21.py").write_text("def load():\n    return undefined_thing_21\n")
    (tmp_path / "buggy_21.py").write_text("from worker import job\nimport helper_21\n\nCONFIG = helper_21.load()\n")
    res = run_in(tmp_path, env, *(["enqueue", "x", "--queue", "q"] if command else []),
                 JOB_MODULES="buggy_21", PYTHONPATH=f"{tmp_path}:{env['PYTHONPATH']}")
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip("\n").splitlines()
    helper = tmp_path / "helper_21.py"
    assert f'File "{tmp_path / "buggy_21.py"}", line 4' in res.stderr, res.stderr
    assert f'File "{helper}", line 2, in load' in res.stderr and "return undefined_thing_21" in res.stderr
    last = lines[-1]
    assert last.startswith("error: config: JOB_MODULES=") and "cannot import 'buggy_21'" in last, last
    assert "NameError" in last and f"{helper}:2" in last and "expected importable" not in last, last
    assert "importlib" not in res.stderr and "worker/jobs.py" not in res.stderr, res.stderr


# --- no silent defaults: what a worker imported, registered and serves (issue 21 item 5) ---

@pytest.mark.timeout(60)
def test_worker_start_names_modules_jobs_and_queues_and_warns_about_gaps(r, cli):
    """Issue 21 item 5: `worker.start` says which modules were imported, each job with its queue, and the queues
    served; a registered queue that QUEUES does not serve, and a JOB_MODULES entry that registers no job, are
    warnings naming them."""
    # tests.jobs_api imports tests.jobs first: tests.jobs registers nothing new, yet defines jobs (no warning)
    res = cli("--burst", JOB_MODULES="worker.sample,tests.jobs_api,tests.jobs,json", QUEUES="default")
    assert res.returncode == 0, res.stderr
    start = next(line for line in res.stdout.splitlines() if "event=worker.start" in line)
    assert "modules=worker.sample,tests.jobs_api,tests.jobs,json" in start and "queues=default" in start, start
    assert "sample_work@default" in start and "on_high@high" in start, start
    warnings = [line for line in res.stdout.splitlines() if "level=warning" in line]
    assert any("worker.queues_not_served" in w and "queue=high" in w and "on_high" in w for w in warnings), \
        warnings
    assert any("worker.module_without_jobs" in w and "module=json" in w for w in warnings), warnings
    assert not any("module=tests.jobs" in w or "module=worker.sample" in w for w in warnings), warnings


def test_a_job_result_ttl_past_what_redis_can_expire_is_refused():
    """Issue 27 item 10: @job(result_ttl=9e15) passed and would have made PEXPIRE fail after the claim's LREM."""
    from worker import jobs
    with pytest.raises(ValueError, match="result_ttl"):
        jobs.job(result_ttl=9e15)(lambda: None)


# --- REDIS_URL: Unix sockets, redacted passwords; the server's eviction policy checked ---

@pytest.mark.timeout(60)
def test_unix_socket_redis_url(tmp_path, env, cli):
    """Origin: runtime review (9f32e73, hardening)."""
    if not shutil.which("redis-server"):
        pytest.skip("redis-server missing")
    sock = tmp_path / "redis.sock"
    srv = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(sock), "--save", "",
                            "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        wait_until(sock.exists, 10, "the unix socket")
        res = cli("enqueue", "push", "--args", '["out", 1]', REDIS_URL=f"unix://{sock}")
        assert res.returncode == 0, res.stderr
        res = cli("--burst", REDIS_URL=f"unix://{sock}")
        assert res.returncode == 0 and "event=job.done" in res.stdout, res.stdout + res.stderr
    finally:
        srv.kill()
        srv.wait(10)


@pytest.mark.parametrize("url,secret", [
    ("redis://:p#ss@h:1/0", "p#ss"), ("redis://h:1/0?password=s3cret", "s3cret"),
    ("rediss://user:pa:ss@h", "pa:ss"), ("redis://secret@h", "secret"), ("redis://:a/b?c@h/0", "a/b?c")])
def test_redaction_hides_passwords_parsers_would_misread(url, secret):
    """Origin: runtime review (9f32e73, hardening)."""
    assert secret not in redact_url(url)


def test_check_server_warns_about_eviction(r):
    """Origin: issue 10, adversarial review, hardening."""
    b = make_broker(r)
    assert b.check_server() is None
    r.config_set("maxmemory-policy", "allkeys-lru")
    try:
        warning = b.check_server()
    finally:
        r.config_set("maxmemory-policy", "noeviction")
    assert warning and "allkeys-lru" in warning and "noeviction" in warning
