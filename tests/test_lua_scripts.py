"""The Redis scripts as files (worker/lua/*.lua, issue 22 point 3): every script loads into a real Redis, says what
it takes and returns in a header, names its KEYS and ARGV at the top, and builds every other key it touches from a
key passed in KEYS (what Redis Cluster needs, issue 26). The scripts' behaviour is tested by feature elsewhere
(test_core, test_recovery, test_schedule, test_metrics, ...)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from worker import lua
from worker.keys import Keys
from worker.lua import calls

LUA_DIR = Path(lua.__file__).parent
REPO = Path(__file__).resolve().parent.parent


def header(name: str) -> list:
    lines = lua.read(name).splitlines()
    return lines[:next(i for i, line in enumerate(lines) if not line.startswith("--"))]


def body(name: str) -> str:
    return "\n".join(lua.read(name).splitlines()[len(header(name)):])


def declared(name: str, what: str) -> list:
    """The n of every ``-- KEYS[n] <name>`` (or ARGV) line of the header."""
    return [int(m.group(1)) for line in header(name) if (m := re.match(rf"-- {what}\[(\d+)\] \w+", line))]


def test_every_lua_file_is_a_script_the_loader_knows():
    files = sorted(p.stem for p in LUA_DIR.glob("*.lua"))
    assert files == sorted(lua.NAMES + ("prelude",))


def test_every_script_loads_into_redis(r):
    for name in lua.NAMES:
        assert r.script_load(lua.source(name)), name


@pytest.mark.parametrize("name", lua.NAMES)
def test_header_says_keys_argv_reply_and_invariants(name):
    text = "\n".join(header(name))
    assert re.match(rf"-- {name.upper()}: \S", text), f"{name}.lua: the header starts with '-- {name.upper()}: ...'"
    for part in ("KEYS", "ARGV", "Reply:", "Invariants:"):
        assert f"-- {part}" in text or f"\n-- {part}" in text or part in text, f"{name}.lua: no {part} in its header"
    keys = declared(name, "KEYS")
    assert keys == list(range(1, len(keys) + 1)), f"{name}.lua: KEYS declared out of order: {keys}"
    argv = declared(name, "ARGV")
    assert argv == list(range(1, len(argv) + 1)), f"{name}.lua: ARGV declared out of order: {argv}"


@pytest.mark.parametrize("name", lua.NAMES)
def test_keys_and_argv_are_named_at_the_top_and_declared(name):
    """KEYS[n] and ARGV[n] with a literal n appear only in the `local` lines at the top, and each is declared."""
    lines = body(name).splitlines()
    top = next(i for i, line in enumerate(lines) if not line.startswith("local "))
    for i, line in enumerate(lines):
        for what, n in re.findall(r"\b(KEYS|ARGV)\[(\d+)\]", line):
            assert i < top, f"{name}.lua: {what}[{n}] used below the named locals: {line.strip()}"
            assert int(n) in declared(name, what), f"{name}.lua: {what}[{n}] is not declared in the header"


@pytest.mark.parametrize("name", lua.NAMES)
def test_every_derived_key_is_built_from_a_key_passed_in_keys(name):
    """A key built in Lua (`<root> .. ':...'`) starts from the prefix, which comes from KEYS, never from ARGV."""
    text = body(name)
    from_keys = set()
    for line in text.splitlines():
        if line.startswith("local ") and "=" in line:
            names, values = line[6:].split("=", 1)
            for var, value in zip(names.split(","), values.split(",")):
                if "KEYS[" in value or (var.strip() == "prefix" and "string.sub(schedules" in value):
                    from_keys.add(var.strip())
    for root in re.findall(r"([\w\[\]]+)\s*\.\.\s*':\w", text):
        assert root in from_keys, f"{name}.lua builds a key from {root!r}, which is not a key passed in KEYS"
    assert not re.search(r"ARGV\[[^\]]+\]\s*\.\.\s*':\w", text), f"{name}.lua builds a key from ARGV"


def test_prelude_helpers_take_their_prefix_as_an_argument():
    """The prelude's functions build keys only from their `prefix` parameter (a KEYS value at every call site)."""
    for fn, block in lua.prelude().items():
        for root in re.findall(r"([\w\[\]]+)\s*\.\.\s*':\w", block):
            assert root == "prefix" and re.search(rf"local function {fn}\(prefix\b", block), (fn, root)


def test_a_script_gets_the_prelude_functions_it_calls_and_only_those():
    blocks = lua.prelude()
    assert {"clock", "wrong_type", "wake", "ring", "record_failure", "jset", "with_fields"} <= set(blocks)
    used = set()
    for name in lua.NAMES:
        src = lua.source(name)
        have = {fn for fn in blocks if f"local function {fn}(" in src}
        used |= have
        for fn in set(blocks) - have:
            assert not re.search(rf"(?<![\w.:]){fn}\(", src), f"{name}.lua calls {fn} without it"
    assert used == set(blocks), f"prelude functions no script uses: {set(blocks) - used}"
    assert "local function ring(" in lua.CYCLE and "local function decode_record(" not in lua.CYCLE


def test_the_wake_code_and_the_clock_live_once():
    """Issue 22: the wake code had 4 copies, TIME -> ms 5, RECORD_FAILURE one pasted inside a loop branch."""
    for name in lua.NAMES:
        text = lua.read(name)
        assert "redis.call('TIME')" not in text, f"{name}.lua reads TIME itself (prelude: clock)"
        assert "':wake:'" not in text, f"{name}.lua builds a wake key itself (prelude: wake)"
        assert "local function" not in text or name == "recover" or name == "stats", name


def test_every_call_passes_only_keys_of_its_key_space():
    """What Python passes in KEYS: keys of this prefix only (the prefix itself included), and STATS passes some."""
    k = Keys("pfx")
    built = [calls.enqueue(k, "q", "id", 60000, "", [("id", "n", "{}")]),
             calls.cycle(k, "w:1", beat_ttl_ms=1, failed_max=1, failed_ttl_ms=1, wildcard=False, mode="", busy=0,
                         tidy=True, epoch="", queues=["q"], checkpoints=[], outcomes=[], claim=[0]),
             calls.recover(k, 1, 1, 1, 1, "", 1), calls.heartbeat(k, "w", 1), calls.unregister(k, "w"),
             calls.wake(k, ["q"]), calls.schedule(k, []), calls.stats(k, 0, "", True, []),
             calls.retry_failed(k, ["x"]), calls.run_now(k, ["{}"]), calls.housekeep(k, 1, 1, 1),
             calls.failed_page(k, "", "", 0, 1), calls.failed_match(k, "", ""), calls.find_queued(k, "q", "x"),
             calls.backlog(k, True, []), calls.await_(k, "x"),
             calls.cancel(k, "x", 1), calls.group(k, "g", 1, 1, ("{}", "c", "n", "q"), [("i", "n", "q", "{}")])]
    assert sorted(c.script for c in built) == sorted(lua.NAMES)
    for c in built:
        assert c.keys, f"{c.script}: no KEYS"
        assert all(key == "pfx" or key.startswith("pfx:") for key in c.keys), (c.script, c.keys)
        assert len(c.keys) == max(declared(c.script, "KEYS") or [len(c.keys)]), (c.script, c.keys)


def test_the_scripts_ship_in_the_wheel():
    """tests/test_package.py drains a job with the installed wheel; this names the cause if the .lua files go."""
    text = (REPO / "pyproject.toml").read_text()
    assert '"worker.lua" = ["*.lua"]' in text and '"worker.lua"' in text.split("packages = ", 1)[1].split("\n")[0]


def test_schedule_refuses_a_prefix_that_is_not_its_keys(r):
    """schedule.lua derives P from P:schedules; an ARGV prefix that disagrees is an error reply, nothing written."""
    k = Keys("pfx")
    call = calls.schedule(k, [("s", "q", 0, 1, 1, 1, "every 1s", "{}")])
    call = call._replace(args=["other", *call.args[1:]])
    with pytest.raises(Exception, match="schedules key pfx:schedules is not other:schedules"):
        lua.Registry(r).run(call)
    assert not r.keys("pfx*")


def test_wake_skips_a_wrong_typed_list_and_rings_the_others(r):
    """wake.lua (issue 27: no value aborts a script after its first write): it used redis.call, so a wrong-typed
    second list raised after the first was rung; the prelude's ring is a pcall."""
    k = Keys("pfx")
    r.set(k.wake("b"), "x")
    r.rpush(k.wake("c"), "1")
    lua.Registry(r).run(calls.wake(k, ["a", "b", "c", "d"]))
    assert [r.llen(k.wake(q)) for q in "acd"] == [1, 1, 1] and r.get(k.wake("b")) == "x"


def test_schedule_enqueues_and_records_its_tick_past_a_wrong_typed_wake_list(r):
    """schedule.lua rang the wake list with redis.call after its RPUSH: a wrong-typed P:wake:<q> raised after that
    first write (issue 27), leaving the job queued and its tick unclaimed, to be enqueued again. Now the prelude's
    wake (pcall) skips it."""
    k = Keys("pfx")
    r.set(k.wake("q"), "x")
    now = int(r.time()[0]) * 1000
    call = calls.schedule(k, [("s", "q", now - 10, now + 60_000, 60_000, 120_000, "every 60s", '{"id":"a"}', "a", "1")])
    assert lua.Registry(r).run(call)[1] == "enqueued"
    assert r.llen(k.queue("q")) == 1 and r.hget(k.sched("s"), "tick") == str(now - 10)
