"""The shape of the package (issue 22's bar): no module in worker/ over 400 lines, no import cycle among worker
modules, and no import from a lower layer up to a higher one. Read from the source with ``ast`` (imports inside
functions included, since they couple modules just the same), so nothing is imported or run.

A new module goes into one of :data:`LAYERS`: a module may import its own layer and those below, never above. A
module inside a package (``web.app``, ``lua.calls``) takes its package's layer unless listed itself.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "worker"
MAX_LINES = 400

#: Modules allowed over MAX_LINES while being split, with the count they may not grow past (empty: issue 22 split
#: lua.py, supervisor.py and slots.py).
OVER_LIMIT: dict = {}  # module -> its line count, for a module being split (issue 22 emptied it)

#: Lowest first. Names are module paths relative to worker/ (``__init__`` is the package itself).
LAYERS = [
    # 0: leaves: settings, the key schema, logging, wire formats, signal table, Lua sources, pure helpers
    {"config", "groups", "keys", "log", "protocol", "signals", "orphans", "hooks", "frameworks", "jobtypes", "startup", "lua",
     "api_lua", "api_values", "context"},
    # 1: the payload format and Redis access
    {"payload", "client", "schedule", "fetch", "aio_broker"},
    # 2: the app-facing job API and the job's own process: registry, enqueue, results, inline testing, the child
    {"jobs", "jobspec", "calloptions", "child", "testing", "results", "control", "metrics", "aio", "jobgroups"},
    # 3: the worker's parts: fork server, outcome policy, failed registry, the read model
    {"forkserver", "claimed", "policy", "failed", "api", "api_overview", "api_groups", "status"},
    # 4: the worker's core: slots, stops, membership, the supervisor's loop
    {"slot", "slots", "stops", "ledger", "membership", "supervisor"},
    # 5: entry points and interfaces: the package's public API, the CLI, the dashboard, the sample jobs
    {"__init__", "__main__", "cli", "launch", "sample", "web"},
]


def modules() -> dict:
    """``{dotted name relative to worker/: path}``; the package itself is ``__init__``, a subpackage its name."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, mods: dict) -> str:
    """The module ``name`` (relative, dotted) is in: itself, or its longest listed prefix (``x.attr`` -> ``x``)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or "__init__"


def imports(mod: str, path: Path, mods: dict) -> set:
    """The worker modules ``mod`` imports anywhere in its source (module level, functions, TYPE_CHECKING)."""
    package = mod.split(".") if path.name == "__init__.py" and mod != "__init__" else mod.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {_resolve(a.name[7:], mods) for a in node.names if a.name == "worker" or a.name.startswith("worker.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module != "worker" and not (node.module or "").startswith("worker."):
                    continue
                base = node.module[7:].split(".") if node.module != "worker" else []
            else:
                up = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                base = up + (node.module.split(".") if node.module else [])
            out |= {_resolve(".".join(base + [a.name]), mods) for a in node.names}
    out.discard(mod)
    return out


def graph() -> dict:
    mods = modules()
    return {m: imports(m, p, mods) for m, p in mods.items()}


def cycles(g: dict) -> list:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def layer(mod: str):
    name = mod
    while name:
        for i, members in enumerate(LAYERS):
            if name in members:
                return i
        name = name.rpartition(".")[0]
    return None


def test_no_module_in_worker_is_over_400_lines():
    over = {}
    for mod, path in modules().items():
        rel = path.relative_to(ROOT).as_posix()
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > OVER_LIMIT.get(rel, MAX_LINES):
            over[rel] = n
    assert not over, f"modules over {MAX_LINES} lines (split them by concern): {over}"


def test_no_import_cycle_among_worker_modules():
    found = cycles(graph())
    assert not found, f"import cycles (function-level imports count): {found}"


def test_every_module_has_a_layer_and_imports_none_above_it():
    g = graph()
    unplaced = sorted(m for m in g if layer(m) is None)
    assert not unplaced, f"put these modules into a layer of tests/test_structure.py LAYERS: {unplaced}"
    upward = sorted(f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
                    for m, deps in g.items() for d in deps if layer(d) > layer(m))
    assert not upward, "imports from a lower layer up to a higher one:\n" + "\n".join(upward)


def private_uses(mod: str, path: Path, mods: dict) -> list:
    """``from .x import _y`` and ``x._y`` (``x`` a worker module) in ``mod``: a private name used across modules."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = mod.split(".") if path.name == "__init__.py" and mod != "__init__" else mod.split(".")[:-1]
    bound, out = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            up = package[:len(package) - (node.level - 1)] if node.level > 1 else package
            base = up + (node.module.split(".") if node.module else [])
            for a in node.names:
                target = ".".join(base + [a.name])
                if target in mods:
                    bound[a.asname or a.name] = target
                elif _private(a.name):
                    out.append(f"{mod}:{node.lineno}: from {'.' * node.level}{node.module or ''} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            if _private(node.attr) and bound[node.value.id] != mod:
                out.append(f"{mod}:{node.lineno}: {node.value.id}.{node.attr}")
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_name_is_used_across_worker_modules():
    """issue 22 point 4: a name another module needs is public where it lives (or the user moves there)."""
    mods = modules()
    found = [use for m, p in mods.items() for use in private_uses(m, p, mods)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_checks_see_imports_inside_functions_and_packages():
    """The reader itself: a function-level import, a relative import from a subpackage and an attribute import all
    count, so a cycle hidden in a function is found."""
    g = graph()
    assert "fetch" in g["jobs"]          # jobs.default_broker imports Broker inside the function
    assert "api_groups" in g["web.app"]  # from ..api_groups import read_model, inside a method
    assert "child" in g["__init__"]      # from .child import TermException
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
