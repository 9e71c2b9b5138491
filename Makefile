# One-command entry points. `make demo` runs the main job; `make test` passes the tests (what CI runs).
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: setup demo run test bench bench-shutdown bench-throughput redis clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

setup: $(STAMP)

# The classic demonstration: local redis-server, a worker, sample_work, SIGTERM after 3 s, a printed timeline.
# `make demo TERM_TIMEOUT=1` shows the cleanup cut short and the job put back.
demo: $(STAMP)
	$(PY) scripts/demo.py

# A worker against $REDIS_URL (default redis://localhost:6379/0); `make redis` starts a local server first.
run: $(STAMP)
	$(PY) -m worker

redis:
	redis-cli ping >/dev/null 2>&1 || redis-server --daemonize yes --save '' --appendonly no

test: $(STAMP)
	$(PY) -m pytest

bench: bench-shutdown bench-throughput

bench-shutdown: $(STAMP)
	$(PY) bench/shutdown.py

bench-throughput: $(STAMP)
	test -x bench/.venv/bin/python || python3 -m venv bench/.venv
	bench/.venv/bin/python -m pip install -q --disable-pip-version-check -r bench/requirements.txt
	bench/.venv/bin/python bench/throughput.py

clean:
	rm -rf .venv bench/.venv .pytest_cache
