"""The layers of the source tree: no import cycles in detrkit/ and projects/, the library never
imports a project, and detrkit/checkpoint needs nothing of detrkit/data but its constants.

The graph is read from the source with `ast` (imports at module level and inside functions,
relative imports resolved), not from what a test run happened to import. An edge goes to the
module named: `from a.b import c` is an edge to `a.b.c` when that is a module, else to `a.b`;
importing a submodule also runs its package's `__init__`, which is not counted as an edge (a
package that re-exports its submodules would otherwise be a cycle with each of them).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
ROOTS = ("detrkit", "projects")

# Cycles that are known and owned elsewhere, as sorted tuples of their modules (none today).
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    """`{dotted name: file}` of every module under the roots."""
    return {
        module_name(path): path
        for root in ROOTS
        for path in sorted((REPO_ROOT / root).rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the tree that `name` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def known(target: str) -> str | None:
        """`target` or its longest prefix that is a module of the tree."""
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub; `from mod import name` mod
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            module = known(target)
            if module is not None and module != name:
                found.add(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path that returns to its start) per strongly connected component with more
    than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(component, graph) for component in components]


def _cycle_in(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path from the component's first module back to itself (breadth first)."""
    start = min(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        next_frontier = []
        for node in frontier:
            for succ in sorted(graph[node] & component):
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if succ not in came_from:
                    came_from[succ] = node
                    next_frontier.append(succ)
        frontier = next_frontier
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


# ---------------------------------------------------------------------------------------------
# the checker itself, on small graphs with known answers


def test_find_cycles_names_a_cycle_and_ignores_a_diamond():
    diamond = {"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}
    assert find_cycles(diamond) == []
    looped = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycles(looped) == [["a", "b", "c", "a"]]


def test_relative_and_submodule_imports_are_resolved(tmp_path):
    modules = {
        "pkg": tmp_path / "pkg" / "__init__.py",
        "pkg.sub": tmp_path / "pkg" / "sub" / "__init__.py",
        "pkg.sub.a": tmp_path / "pkg" / "sub" / "a.py",
        "pkg.sub.b": tmp_path / "pkg" / "sub" / "b.py",
        "pkg.c": tmp_path / "pkg" / "c.py",
    }
    for path in modules.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    modules["pkg.sub"].write_text("from . import a\nfrom .b import thing\n")
    modules["pkg.sub.a"].write_text("def f():\n    from ..c import x\n    import os\n")
    assert imports_of("pkg.sub", modules["pkg.sub"], modules) == {"pkg.sub.a", "pkg.sub.b"}
    assert imports_of("pkg.sub.a", modules["pkg.sub.a"], modules) == {"pkg.c"}


# ---------------------------------------------------------------------------------------------
# the tree


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_covers_the_tree(graph):
    assert "detrkit.checkpoint.checkpointer" in graph
    assert "projects.deformable_detr.modeling.deformable_detr" in graph
    assert "detrkit.checkpoint.io" in graph["detrkit.checkpoint.checkpointer"]


def test_no_import_cycles(graph):
    cycles = [c for c in find_cycles(graph) if tuple(sorted(set(c))) not in KNOWN_CYCLES]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def imports_from(graph: dict[str, set[str]], importer: str, imported: str) -> list[str]:
    """`a imports b` for every edge from the package `importer` into the package `imported`."""
    return [
        f"{name} imports {target}"
        for name, targets in sorted(graph.items())
        if in_package(name, importer)
        for target in sorted(targets)
        if in_package(target, imported)
    ]


def test_detrkit_never_imports_projects(graph):
    offenders = imports_from(graph, "detrkit", "projects")
    assert not offenders, "; ".join(offenders)


def test_checkpoint_takes_only_builtin_meta_from_data(graph):
    offenders = imports_from(graph, "detrkit.checkpoint", "detrkit.data")
    offenders = [o for o in offenders if not o.endswith(" detrkit.data.builtin_meta")]
    assert not offenders, "; ".join(offenders)


@pytest.mark.parametrize("module", ["detrkit.checkpoint", "projects.deformable_detr.convert"])
def test_checkpoints_and_conversion_do_not_load_pycocotools(module):
    # a fresh interpreter: in this process other tests have imported pycocotools already
    code = f"import sys, {module}; print('pycocotools' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "False", f"import {module} loads pycocotools"
