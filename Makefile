# One-command entry points. `make demo` runs the main job; `make test` passes the tests (what CI runs).
PY := .venv/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
RUNTIME := .venv/.runtime
DEV := .venv/.dev
# The minimum dependency versions pyproject.toml declares, in a venv of their own (`make test-min`).
PY_MIN := .venv-min/bin/python
MIN := .venv-min/.installed
# The part of the suite that runs a second time against those minimums: core, shutdown, recovery, packaging (their
# single-server cases: `make test` runs the Redis Cluster ones, docs/testing.md).
MIN_TESTS := tests/test_core.py tests/test_shutdown.py tests/test_recovery.py tests/test_package.py

# (`dist`: the sdist and wheel in dist/, checked as PyPI would; CI runs it)
.PHONY: setup demo run test test-fast test-min dist redis-stop bench bench-shutdown bench-throughput bench-concurrency bench-concurrency-celery bench-checkpoint bench-schedule bench-cluster redis clean

# Runtime dependencies only (what Heroku installs): enough for the demo and a worker.
$(RUNTIME): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PIP) -r requirements.txt
	touch $(RUNTIME)

# Everything the tests and benchmarks need on top.
$(DEV): $(RUNTIME) requirements-dev.txt
	$(PIP) -r requirements-dev.txt
	touch $(DEV)

setup: $(DEV)

# The classic demonstration: local redis-server, a worker, sample_work, SIGTERM after 3 s, a printed timeline.
# `make demo TERM_TIMEOUT=1` shows the cleanup cut short and the job put back.
demo: $(RUNTIME)
	$(PY) scripts/demo.py

# A worker against $REDIS_URL (default redis://localhost:6379/0); `make redis` starts a local server first.
run: $(RUNTIME)
	$(PY) -m worker

# A local Redis for development on 127.0.0.1:6379 only (no persistence); `make redis-stop` ends it.
REDIS_PORT ?= 6379
redis:
	redis-cli -h 127.0.0.1 -p $(REDIS_PORT) ping >/dev/null 2>&1 || redis-server --bind 127.0.0.1 --port $(REDIS_PORT) \
		--daemonize yes --save '' --appendonly no --pidfile $(CURDIR)/.redis-$(REDIS_PORT).pid
	@echo "redis on 127.0.0.1:$(REDIS_PORT); stop it with: make redis-stop"

redis-stop:
	redis-cli -h 127.0.0.1 -p $(REDIS_PORT) shutdown nosave 2>/dev/null || true
	rm -f .redis-$(REDIS_PORT).pid

# The release artefacts: sdist and wheel in dist/ (version: worker/__init__.py), metadata checked with twine.
dist: $(DEV)
	rm -rf dist
	$(PY) -m build --no-isolation --outdir dist .
	$(PY) -m twine check --strict dist/*

test: $(DEV)
	$(PY) -m pytest

# For development: everything but the tests marked `slow` (chaos, Redis outages, recovery at default heartbeat
# settings), a few minutes less. CI runs `make test`, slow tests included (docs/testing.md).
test-fast: $(DEV)
	$(PY) -m pytest -m "not slow"

# The dependency floors are true only if they are tested: same dev tools, redis and python-dotenv pinned to the
# minimums declared in pyproject.toml (scripts/min_requirements.py turns `>=X` into `==X`).
$(MIN): pyproject.toml requirements.txt requirements-dev.txt scripts/min_requirements.py
	test -x $(PY_MIN) || python3 -m venv .venv-min
	python3 scripts/min_requirements.py > .venv-min/constraints.txt
	$(PY_MIN) -m pip install -q --disable-pip-version-check -r requirements-dev.txt -c .venv-min/constraints.txt
	touch $(MIN)

test-min: $(MIN)
	$(PY_MIN) -m pip list --disable-pip-version-check 2>/dev/null | grep -iE '^(redis|python-dotenv) '
	$(PY_MIN) -m pytest $(MIN_TESTS) -m "not cluster"

bench: bench-shutdown bench-throughput bench-concurrency bench-checkpoint

bench-shutdown: $(DEV)
	$(PY) bench/shutdown.py

# What checking periodic jobs costs: the SCHEDULE call next to the CYCLE call, and jobs/s with and without schedules.
bench-schedule: $(DEV)
	$(PY) bench/schedule.py

bench-throughput: $(DEV)
	test -x bench/.venv/bin/python || python3 -m venv bench/.venv
	bench/.venv/bin/python -m pip install -q --disable-pip-version-check -r bench/requirements.txt
	bench/.venv/bin/python bench/throughput.py

# WORKER_CONCURRENCY: jobs/s scaling (N = 1..8, vs rq worker-pool), CPU and Redis cost per job, PSS of the dyno with a
# 200 MB app; prints and writes bench/results/concurrency.{txt,json}. `make bench-concurrency ARGS=--quick` for a
# one-minute check. Celery's row in the memory table appears once `make bench-concurrency-celery` made its venv.
bench-concurrency: $(DEV)
	test -x bench/.venv/bin/python || python3 -m venv bench/.venv
	bench/.venv/bin/python -m pip install -q --disable-pip-version-check -r bench/requirements.txt
	bench/.venv/bin/python bench/concurrency.py $(ARGS)

# Celery 5.5 in a venv of its own: kombu's redis extra pins redis-py below the runtime's floor (redis>=5.3).
bench-concurrency-celery:
	test -x bench/.venv-celery/bin/python || python3 -m venv bench/.venv-celery
	bench/.venv-celery/bin/python -m pip install -q --disable-pip-version-check -r bench/requirements-celery.txt

clean:
	rm -rf .venv .venv-min bench/.venv bench/.venv-celery .pytest_cache build dist *.egg-info .redis-*.pid

# What checkpoint() costs per call, and no-op drain rates with and without one checkpoint per job (issue 13).
bench-checkpoint: $(DEV)
	$(PY) bench/checkpoint.py

# Redis Cluster (issue 26): Redis CPU per job on each node and the drain rate, single primary vs one key space on a
# 3-primary cluster vs three key spaces on three primaries (a local cluster: redis-server + redis-cli).
bench-cluster: $(DEV)
	$(PY) bench/cluster.py $(ARGS)
