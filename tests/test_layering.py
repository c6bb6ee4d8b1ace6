"""The package's rooms import downwards only, and no module imports itself in a circle.

Every ``import`` of the package is counted: at module level, inside functions and under
``TYPE_CHECKING`` alike (a local import is still a dependency). docs/architecture.md draws the
same table; a new room must be added to both.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "reinforcepp"

FLOORS: dict[str, int] = {
    "errors": 0,
    "config": 1, "core": 1, "remote": 1,
    "run": 2, "engines": 2,
    "rewards": 3,
    "agents": 4,
    "lm": 5, "gym": 5,
    "serve": 6, "compare": 6, "selfcheck": 6, "cli": 6,
}
"""Each room's floor: a room may import rooms on lower floors only (and itself)."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The package modules ``path`` imports (``from pkg import name`` counts ``pkg.name`` when
    that is a module of its own, else ``pkg``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "reinforcepp")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "reinforcepp":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if module_path(sub) is not None else target)
    out.discard(name)
    return out


def module_path(name: str) -> Path | None:
    base = PACKAGE.parent.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "reinforcepp"


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_every_room_has_a_floor():
    rooms = {room(m) for m in graph()} - {"reinforcepp"}
    assert rooms <= set(FLOORS), (
        f"rooms without a floor (add them here and to docs/architecture.md): {sorted(rooms - set(FLOORS))}")


def test_rooms_import_downwards_only():
    wrong = sorted(f"{a} -> {b}" for a, targets in graph().items() for b in targets
                   if room(a) != room(b) and room(a) in FLOORS and room(b) in FLOORS
                   and FLOORS[room(b)] >= FLOORS[room(a)])
    assert not wrong, "imports that are not downwards:\n" + "\n".join(wrong)


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles():
    cycles = find_cycles(graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checks_can_fail():
    """The graph sees relative, local and TYPE_CHECKING imports (so the tests above can fail)."""
    lm_config = imports_of(PACKAGE / "lm" / "config.py")
    assert "reinforcepp.engines" in lm_config and "reinforcepp.run.options" in lm_config
    trainer = imports_of(PACKAGE / "lm" / "trainer.py")
    assert "reinforcepp.lm.components" in trainer
    counts: dict[str, int] = defaultdict(int)
    for targets in graph().values():
        for t in targets:
            counts[room(t)] += 1
    assert counts["core"] > 10 and counts["engines"] > 3
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
