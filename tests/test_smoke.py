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
