"""Item 6 of issue 12: queue_depth/queue_latency (one round trip, Redis clock, as status computes them) and the
l2met sample# lines, logged by one worker per METRICS_INTERVAL (real redis-server)."""
from __future__ import annotations

import io
import json
import re
import time

import pytest

import worker
from worker import config, jobs, metrics, testing
from worker.fetch import Broker
from worker.log import Logger
from tests.support import make_broker, wait_until

from tests.conftest import REPO


def _put(r, queue, n, age):
    """``n`` payloads on ``queue`` whose head was enqueued ``age`` seconds ago (Redis clock)."""
    sec, usec = r.time()
    now = sec + usec / 1e6
    for i in range(n):
        r.rpush(f"worker:queue:{queue}", json.dumps({"id": f"{queue}{i}", "name": "push", "queue": queue,
                                                     "args": [], "kwargs": {}, "enqueued_at": now - age + i}))
    r.sadd("worker:queues", queue)


@pytest.fixture
def b(r, redis_server):
    broker = make_broker(r, QUEUES="default,empty")
    jobs.use(broker)
    yield broker
    jobs.use(None)


def test_depth_and_latency_match_status_json(r, b, cli):
    _put(r, "default", 3, age=100)
    _put(r, "mail", 1, age=40)
    r.rpush("worker:queue:junk", "not json")
    r.sadd("worker:queues", "junk")
    depth, latency = worker.queue_depth(), worker.queue_latency()
    out = cli("status", "--json", QUEUES="default,empty")
    assert out.returncode == 0, out.stderr
    status = {q["name"]: q for q in json.loads(out.stdout)["queues"]}
    assert depth == {q: s["depth"] for q, s in status.items()} == {"default": 3, "empty": 0, "junk": 1, "mail": 1}
    assert latency["empty"] == status["empty"]["latency"] == 0.0
    assert latency["junk"] is None and status["junk"]["latency"] is None  # unreadable head
    for q in ("default", "mail"):  # status ran a moment later: same clock, a little more waiting
        assert 0 <= status[q]["latency"] - latency[q] < 5, (q, latency, status)
    assert 100 <= latency["default"] < 105 and 40 <= latency["mail"] < 45


def test_named_queues_and_one_script_call(r, b):
    _put(r, "a", 2, age=5)
    worker.queue_depth(["a"])  # loads the script once
    before = r.info("commandstats")
    got = metrics.queue_stats(["a", "b", "a"])
    after = r.info("commandstats")

    def calls(cmd):
        return after.get(f"cmdstat_{cmd}", {}).get("calls", 0) - before.get(f"cmdstat_{cmd}", {}).get("calls", 0)
    assert got["a"][0] == 2 and 5 <= got["a"][1] < 10 and got["b"] == (0, 0.0) and list(got) == ["a", "b"]
    assert calls("evalsha") + calls("eval") == 1 and calls("llen") == 2  # both LLENs ran inside the one script


def test_latency_is_on_the_redis_clock_not_the_callers(r, b):
    """A producer whose clock runs ahead wrote an enqueued_at in the future: latency is 0, never negative."""
    sec, _ = r.time()
    r.rpush("worker:queue:default", json.dumps({"id": "x", "name": "push", "args": [], "kwargs": {},
                                                "enqueued_at": sec + 3600}))
    assert worker.queue_latency(["default"]) == {"default": 0.0}


def test_inline_mode_reports_empty_queues_without_redis():
    with testing.inline():
        assert worker.queue_depth(["default"]) == {"default": 0}
        assert worker.queue_latency(["default"]) == {"default": 0.0}


def _lines(stream):
    return [line for line in stream.getvalue().splitlines() if "event=metrics" in line]


def test_one_worker_per_interval_logs_the_sample_lines(r, redis_server):
    _put(r, "default", 2, age=30)
    streams = [io.StringIO(), io.StringIO(), io.StringIO()]
    workers = []
    for i, s in enumerate(streams):
        cfg = config.from_mapping({"REDIS_URL": redis_server.url, "METRICS_INTERVAL": "0.5", "QUEUES": "default,low"})
        workers.append((metrics.Sampler(cfg, f"w{i}"), make_broker(r, METRICS_INTERVAL="0.5"),
                        Logger("INFO", stamp=False, stream=s, worker=f"w{i}")))
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2.6:  # three "workers" whose loops turn every 20 ms
        for sampler, broker, log in workers:
            sampler.maybe_sample(broker, log, time.monotonic())
        time.sleep(0.02)
    lines = [line for s in streams for line in _lines(s)]
    # about one per 0.5 s interval (2.6 s touch at most 7 intervals), from whichever worker looked first: without
    # the per-interval key every worker would log each time (about 15 lines)
    assert 4 <= len(lines) <= 7, lines
    rx = re.compile(r"^level=info event=metrics sample#queue\.default\.depth=2 sample#queue\.default\.latency="
                    r"(\d+\.\d{3})s sample#queue\.low\.depth=0 sample#queue\.low\.latency=0\.000s worker=w\d$")
    assert all(rx.match(line) and 30 <= float(rx.match(line).group(1)) < 40 for line in lines), lines
    keys = r.keys("worker:metrics:*")
    assert 1 <= len(keys) <= 3 and all(0 < r.pttl(k) <= 1000 for k in keys)  # each expires after 2 intervals
    assert len({r.get(k) for k in keys} - {"w0", "w1", "w2"}) == 0


def test_not_due_costs_nothing_and_zero_is_off(redis_server):
    cfg = config.from_mapping({"REDIS_URL": redis_server.url, "METRICS_INTERVAL": "60"})
    s = metrics.Sampler(cfg, "w")
    s._next = time.monotonic() + 60
    assert s.maybe_sample(None, None, time.monotonic()) is False  # no broker, no log touched: nothing ran
    off = metrics.Sampler(config.from_mapping({"METRICS_INTERVAL": "0"}), "w")
    assert off.maybe_sample(None, None, time.monotonic() + 1e9) is False
    assert config.from_mapping({}).metrics_interval == 60.0
    with pytest.raises(config.ConfigError, match="METRICS_INTERVAL"):
        config.from_mapping({"METRICS_INTERVAL": "-1"})


def test_a_redis_error_is_logged_and_skipped():
    cfg = config.from_mapping({"REDIS_URL": "redis://127.0.0.1:1/0", "METRICS_INTERVAL": "1", "REDIS_TIMEOUT": "0.2"})
    from worker.client import connect
    out = io.StringIO()
    s = metrics.Sampler(cfg, "w")
    assert s.maybe_sample(Broker(connect(cfg, retries=0), cfg), Logger("DEBUG", stamp=False, stream=out),
                          time.monotonic()) is False
    assert "event=metrics.skipped" in out.getvalue()


@pytest.mark.timeout(60)
def test_running_workers_log_sample_lines(r, spawn):
    _put(r, "default", 0, age=0)
    ws = [spawn(METRICS_INTERVAL="1", LOG_LEVEL="INFO", QUEUES="default") for _ in range(2)]
    t0 = time.monotonic()
    lines = lambda: sum(w.output.count("event=metrics sample#queue.default.depth=0") for w in ws)  # noqa: E731
    wait_until(lambda: lines() >= 3, 20, "three sample lines from the two workers together")
    # whichever worker wins an interval logs it: together they log about one line per interval, not two
    assert lines() <= (time.monotonic() - t0) / 1.0 + 2, [w.output for w in ws]
