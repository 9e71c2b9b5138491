"""The README's promise in miniature: enqueue through the CLI, drain in burst mode, nothing left behind."""


def test_enqueue_then_burst_drains(r, cli, spawn):
    for i in range(3):
        res = cli("enqueue", "push", "--args", f'["out", {i}]')
        assert res.returncode == 0, res.stderr
        assert len(res.stdout.strip()) == 32
    w = spawn("--burst")
    assert w.wait(30) == 0, w.output
    assert r.lrange("out", 0, -1) == ["0", "1", "2"]
    assert r.keys("worker:processing:*") == []
    assert r.get("worker:stat:processed") == "3"


def test_the_fork_server_side_imports_no_redis_client():
    """The fork server imports the app and forks every job from it: what it imports, every fork copies. It must not
    pull in redis-py (nor asyncio, status, metrics): those belong to the worker process and to producers."""
    import subprocess
    import sys
    code = ("import sys, worker, worker.child, worker.forkserver, worker.jobs, worker.log, worker.sample; "
            "bad = [m for m in ('redis', 'asyncio', 'worker.status', 'worker.metrics', 'worker.client') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
