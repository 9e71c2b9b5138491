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


def test_the_package_has_no_import_cycle():
    """Issue 9 asked to break fetch <-> jobs (the broker built payloads through the registry module, which imported
    the broker back): the payload format lives in payload.py, which both use. No module of the package may import
    itself back through others, lazy (function-level) imports included."""
    import ast
    import pathlib
    root = pathlib.Path(__file__).resolve().parent.parent / "worker"
    names = {p.stem for p in root.glob("*.py")}
    graph = {}
    for p in root.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("worker")):
                parts = (node.module or "").split(".")
                sub = parts[1] if parts[0] == "worker" and len(parts) > 1 else parts[0] if node.level else ""
                deps.update([sub] if sub else [a.name for a in node.names])
        graph[p.stem] = deps & names - {p.stem}
    assert {"fetch", "jobs", "payload"} <= set(graph) and "payload" in graph["fetch"]

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for n in graph[todo.pop()]:
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return seen
    cyclic = sorted(m for m in graph if m in reach(m))
    assert cyclic == [], {m: sorted(graph[m]) for m in cyclic}
