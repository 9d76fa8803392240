"""Imports point one way. The ``frugal`` package is read from its source files (no module is imported):
every ``import`` / ``from … import`` anywhere in a module — at module level or inside a function — is an
arrow from that module to the module it names, and

* no arrows may form a cycle between modules (a cycle is reported as its path);
* no arrow may point up the layers, lowest first:

      conf ← tasks ← rewards ← runtime ← inference ← train ← evaluator ← recipes

  (a module may import its own layer or a lower one). A module's layer is the first component of its name
  after ``frugal.`` (``frugal.train.prm`` → ``train``).

Resolution: ``from frugal.a import b`` names the module ``frugal.a.b`` when there is one, else
``frugal.a`` (``b`` is a name in it); relative imports are resolved against the importing module's
package. Importing a module runs its parent packages' ``__init__`` first, so the parents of a named module
are not arrows, and neither is an import of a module's own parent package (it is already being
imported). Folders come from ``pyproject.toml``'s ``[tool.setuptools.package-dir]``; ``scripts/`` and
``tests/`` are not part of the package and not part of the graph.
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["conf", "tasks", "rewards", "runtime", "inference", "train", "evaluator", "recipes"]


@dataclass(frozen=True)
class Arrow:
    source: str
    target: str
    where: str  # file:line of the import

    def __str__(self) -> str:
        return f"{self.source} -> {self.target}  ({self.where})"


def package_modules() -> dict[str, Path]:
    """Every module of the ``frugal`` package, by dotted name, with its source file."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    modules = {}
    for package, folder in package_dir.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _named(module: str, alias: str | None, modules: dict[str, Path]) -> str | None:
    """The graph's module for ``from module import alias`` (``alias`` None: ``import module``)."""
    if alias is not None and f"{module}.{alias}" in modules:
        return f"{module}.{alias}"
    return module if module in modules else None


def imports_of(name: str, source: str, where: str, modules: dict[str, Path]) -> list[Arrow]:
    """The arrows out of module ``name`` whose text is ``source`` (``where``: its file, for messages)."""
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    arrows = []
    for node in ast.walk(ast.parse(source, filename=where)):
        targets = []
        if isinstance(node, ast.Import):
            targets = [_named(a.name, None, modules) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x`, `from ..a import y`
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - (node.level - 1)])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            targets = [_named(module, a.name, modules) for a in node.names]
        for target in targets:
            if target is None or target == name or name.startswith(target + "."):
                continue  # outside the package, itself, or its own parent package (already being imported)
            arrows.append(Arrow(name, target, f"{where}:{node.lineno}"))
    return arrows


def import_graph() -> dict[str, list[Arrow]]:
    modules = package_modules()
    return {name: imports_of(name, path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)), modules)
            for name, path in modules.items()}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # the root package `frugal` has no layer


def cycles(graph: dict[str, list[Arrow]]) -> list[list[Arrow]]:
    """One cycle (as its arrows) per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for arrow in graph[v]:
            w = arrow.target
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(sorted(c)[0], c, graph) for c in components]


def _cycle_in(start: str, component: set[str], graph: dict[str, list[Arrow]]) -> list[Arrow]:
    """A shortest cycle through ``start`` inside its component (breadth-first search back to it)."""
    previous: dict[str, Arrow] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for arrow in graph[v]:
                w = arrow.target
                if w not in component or w in previous:
                    continue
                previous[w] = arrow
                if w == start:
                    path, node = [], start
                    while True:
                        path.append(previous[node])
                        node = previous[node].source
                        if node == start:
                            return path[::-1]
                following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # unreachable for a strongly connected component


def test_the_graph_covers_every_layer():
    graph = import_graph()
    assert {layer(m) for m in graph} - {None} == set(LAYERS), "a layer without modules, or a module outside LAYERS"
    assert sum(len(a) for a in graph.values()) > 50  # the reader found the imports


def test_no_import_cycles():
    found = cycles(import_graph())
    report = "\n\n".join(" ->\n".join(str(a) for a in cycle) for cycle in found)
    assert not found, f"import cycles between modules:\n{report}"


def test_imports_point_down_the_layers():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [a for arrows in import_graph().values() for a in arrows
              if layer(a.source) and layer(a.target) and rank[layer(a.target)] > rank[layer(a.source)]]
    report = "\n".join(f"{a}   [{layer(a.source)} imports {layer(a.target)}]" for a in upward)
    assert not upward, f"imports against the layer order {' <- '.join(LAYERS)}:\n{report}"


@pytest.mark.parametrize("source, expected", [
    ("from frugal.train import distributed as dist\nfrom frugal.rewards import Rewards\n",
     {"frugal.train.distributed", "frugal.rewards"}),
    ("def f():\n    from .rows import BadRow\n    import frugal.runtime.io\n", {"frugal.tasks.rows", "frugal.runtime.io"}),
    ("from . import rows\nfrom frugal.tasks import files\nimport frugal.tasks\n", {"frugal.tasks.rows"}),
    ("import torch\nfrom typing import Any\n", set()),
])
def test_the_reader_resolves_imports(source, expected):
    # read as if it were tasks/files.py: relative names resolve against frugal.tasks
    arrows = imports_of("frugal.tasks.files", source, "tasks/files.py", package_modules())
    assert {a.target for a in arrows} == expected


def test_the_cycle_finder_reports_a_cycle_as_its_path():
    def arrows(source, *targets):
        return [Arrow(source, t, f"{source}.py:1") for t in targets]

    graph = {"a": arrows("a", "b"), "b": arrows("b", "c", "d"), "c": arrows("c", "a"), "d": []}
    (cycle,) = cycles(graph)
    assert [(x.source, x.target) for x in cycle] == [("a", "b"), ("b", "c"), ("c", "a")]
    assert cycles({"a": arrows("a", "b"), "b": []}) == []
