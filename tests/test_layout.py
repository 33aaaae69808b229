"""The architecture as a test: every module of ``scratch/`` and ``reference/`` (subpackages
included) is parsed, each ``import`` (at the top or inside a function) becomes an arrow, and

    scratch (the maths)  <-  scratch.pipeline  <-  reference (torch mirrors)
                         <-  reference.pipeline  <-  reference.compare

arrows may only point left (or stay in their room), no module reaches torch, transformers or
reference from scratch, nothing imports tests, bench or tutorials, and there is no cycle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("scratch", "reference")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports, as absolute dotted names (relative ones resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)   # `from pkg import module`
    return found


def project_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the project modules (and outside top-level names) it imports."""
    paths = {module_name(p): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    graph = {}
    for mod, path in paths.items():
        arrows = set()
        for target in imports_of(path, mod):
            if target.split(".")[0] in PACKAGES:
                while target not in paths and "." in target:   # `from pkg.mod import name`
                    target = target.rpartition(".")[0]
                if target != mod and target in paths:
                    arrows.add(target)
            else:
                arrows.add(target.split(".")[0])
        graph[mod] = arrows
    return graph


def room(module: str) -> int:
    """The layer a project module lives in: imports may only go to the same or a lower one."""
    if module.startswith("scratch.pipeline"):
        return 1
    if module.startswith("scratch"):
        return 0
    if module.startswith("reference.pipeline"):
        return 3
    if module == "reference.compare":
        return 4
    return 2                                      # reference's torch mirrors of the maths


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles among project modules (one path each), by depth-first search."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def wrong_way(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, targets in graph.items():
        for t in targets:
            if t in graph and room(t) > room(mod):
                bad.append(f"{mod} -> {t}")
            if mod.startswith("scratch") and t in {"torch", "transformers", "captum"}:
                bad.append(f"{mod} -> {t}")
            if t in {"tests", "bench", "tutorials"}:
                bad.append(f"{mod} -> {t}")
    return sorted(bad)


def test_the_walk_sees_every_room():
    graph = project_graph()
    rooms = {room(m) for m in graph}
    assert rooms == {0, 1, 2, 3, 4}
    assert {"scratch.gru", "scratch.pipeline.train", "reference.gru",
            "reference.pipeline.train", "reference.compare"} <= set(graph)


def test_no_import_cycle():
    assert cycles(project_graph()) == []


def test_every_arrow_points_down_the_layers():
    assert wrong_way(project_graph()) == []


@pytest.mark.parametrize("files, expect_cycle, expect_wrong", [
    ({"scratch/__init__.py": "", "scratch/a.py": "from . import b",
      "scratch/b.py": "def f():\n    from .a import x"}, True, False),
    ({"scratch/__init__.py": "", "scratch/a.py": "from .pipeline.c import y",
      "scratch/pipeline/__init__.py": "", "scratch/pipeline/c.py": "y = 1"}, False, True),
    ({"scratch/__init__.py": "", "scratch/a.py": "import torch"}, False, True),
    ({"scratch/__init__.py": "", "scratch/pipeline/__init__.py": "",
      "scratch/pipeline/c.py": "from ..a import x", "scratch/a.py": "x = 1"}, False, False),
])
def test_the_checks_catch_what_they_should(tmp_path, monkeypatch, files, expect_cycle,
                                           expect_wrong):
    """The checker itself, on small trees made here: a lazy import closing a cycle, an arrow
    up from the maths into the pipeline, torch in scratch, and a legal arrow down."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "reference").mkdir()
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    graph = project_graph(tmp_path)
    assert bool(cycles(graph)) == expect_cycle
    assert bool(wrong_way(graph)) == expect_wrong
