"""The house's shape: lower folders never import higher ones, and no module imports itself round a cycle.

Data flows checkpoint → stats → scores → plan → checkpoint; the folders are floors in that order.
`stats_formats` is the file format and must not depend on the tool at all.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A module may import its own floor or any floor below it.
FLOORS = [
    "stats_formats",
    "surgery",  # surgery/__init__.py: the version string only
    "surgery.errors",
    "surgery.architectures",
    "surgery.io",
    "surgery.model",
    "surgery.collect",
    "surgery.criteria",
    "surgery.plan",
    "surgery.rewrite",
    "surgery.refine",
    "surgery.eval",
    "surgery.hub",
    "surgery.pipeline",
    "surgery.cli",
]


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("surgery", "stats_formats"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every project module this module imports (at any depth of its body, lazy imports included)."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    found.discard(module)
    return found


def _floor(module: str) -> int:
    best = max((f for f in FLOORS if module == f or module.startswith(f + ".")), key=len)
    return FLOORS.index(best)


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_floor():
    assert all(_floor(m) >= 0 for m in _graph())


def test_no_upward_import():
    upward = [
        f"{m} (floor {FLOORS[_floor(m)]}) imports {d} (floor {FLOORS[_floor(d)]})"
        for m, deps in _graph().items() for d in sorted(deps) if _floor(d) > _floor(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = _graph()
    # a package's __init__ re-exports its own modules: those edges are not cycles of meaning
    edges = {m: {d for d in deps if not m or not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: a lower module importing a higher one is found."""
    fake = tmp_path / "m.py"
    fake.write_text("from surgery.cli import main\n")
    deps = _imports("surgery.io.fake", fake, {"surgery.cli", "surgery.io.fake"})
    assert deps == {"surgery.cli"} and _floor("surgery.cli") > _floor("surgery.io.fake")
