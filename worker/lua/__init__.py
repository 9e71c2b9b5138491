"""The runtime's Redis scripts: one ``<name>.lua`` file each, beside this module, and their loader.

Each file starts with a header (its KEYS one per line with their meaning, its ARGV by name, its reply, the
invariants it enforces), then names its KEYS and ARGV as locals. Every key a script touches is passed in KEYS or
derived from one key passed in KEYS (the prefix ``P``, passed as a key of its own, or ``P:schedules``), never from
ARGV: what Redis Cluster needs (all of one key space on one hash slot, issue 26).

``prelude.lua`` holds the helpers the scripts share (Redis's clock in ms, the TYPE guard, the wake-up, the failed
registry's record, status records, ...). :func:`source` puts in front of a script only the prelude functions it
calls (and those they call): an unused helper would still cost a closure per call, and CYCLE runs once per job.

The argument layout of every script and the parsing of its reply live in one place, :mod:`worker.lua.calls`.

Why a package (``worker/lua/``) and not a ``worker/scripts.py``: the ``.lua`` files live beside their loader, so
``worker.lua.CYCLE`` and friends (the full source, prelude included) keep their names for every importer, and the
wheel ships them as package data of ``worker.lua`` (pyproject.toml).

Invariant (issue 27 item 1), true of every script: a key of the wrong type never makes a script raise after its
first write. Keys that hold jobs or must take an outcome are TYPE-checked before the first write (a wrong one
refuses the whole call, writing nothing); every other key is used through ``redis.pcall``.
"""
from __future__ import annotations

import functools
import re
from importlib import resources

#: Every script, by file name (``worker/lua/<name>.lua``).
NAMES = ("enqueue", "cycle", "recover", "unregister", "heartbeat", "wake", "schedule", "stats", "retry_failed",
         "run_now", "housekeep", "failed_page", "failed_match", "find_queued", "backlog", "await", "cancel",
         "group")

_FN = re.compile(r"^local function (\w+)\(", re.M)


@functools.lru_cache(maxsize=None)
def read(name: str) -> str:
    """The text of ``worker/lua/<name>.lua`` as written (no prelude)."""
    return resources.files(__name__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def prelude() -> dict:
    """``{function name: its block}`` of ``prelude.lua``, in file order (each block: ``local function <name>(``
    up to the next blank line; the file's leading comment is not a block)."""
    blocks = {}
    for block in read("prelude").split("\n\n"):
        m = _FN.search(block)
        if m:
            blocks[m.group(1)] = block.strip("\n") + "\n"
    return blocks


def _calls(text: str, name: str) -> bool:
    return re.search(rf"(?<![\w.:]){name}\(", text) is not None


def source(name: str) -> str:
    """The script as Redis runs it: the prelude functions ``name`` calls (and theirs), then the file."""
    body, blocks = read(name), prelude()
    wanted, grew = set(), True
    while grew:  # the functions called by the script or by a function already wanted
        grew = False
        for fn, block in blocks.items():
            if fn not in wanted and (_calls(body, fn) or any(_calls(blocks[w], fn) for w in wanted)):
                wanted.add(fn)
                grew = True
    return "".join(block for fn, block in blocks.items() if fn in wanted) + body


# Each script's full source (``source``) is built on first use and kept: building all of them at import cost
# every worker and fork server ~100 ms of start-up (a tenth of a 2,000-job burst drain, bench/drain_ab.py).

@functools.lru_cache(maxsize=None)
def script_source(name: str) -> str:
    """:func:`source` of ``name``, built once per process."""
    return source(name)


def __getattr__(attr: str) -> str:
    """``worker.lua.CYCLE`` and the like: the script's full source (built on first use)."""
    if attr.lower() in NAMES:
        return script_source(attr.lower())
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


class Registry:
    """The scripts registered on one redis-py client (SHA computed once each, loaded into Redis on first use)."""

    def __init__(self, client):
        self.client = client
        self._scripts: dict = {}

    def script(self, name: str):
        """The redis-py ``Script`` of ``worker/lua/<name>.lua``."""
        s = self._scripts.get(name)
        if s is None:
            s = self._scripts[name] = self.client.register_script(script_source(name))
        return s

    def run(self, call, client=None):
        """Run a :class:`worker.lua.calls.Call` (``client``: a pipeline to queue it on instead)."""
        client = getattr(client, "pipe", client)  # a cluster's node pipeline (client.SlotClient): redis-py's own
        return self.script(call.script)(keys=call.keys, args=call.args, client=client)
