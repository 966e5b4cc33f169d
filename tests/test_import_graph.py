"""No module of cola_train imports a module that imports it back (../shared/DESIGN.md).

Function-level imports count: an import inside a function closes the same loop when the function
runs, and a loop is what made `config.validate` reach up into data, chain and distributed (a
16-file cycle). The graph is read with `ast`, so the test imports nothing it checks.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cola_train"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The cola_train modules `path` imports anywhere in its body (absolute or relative)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in modules:      # a name inside a module: its module
            target = target.rsplit(".", 1)[0] if "." in target else ""
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("cola_train"):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("cola_train"):
                stem = node.module
            else:
                continue
            for alias in node.names:                  # `from . import chain` names a module
                full = f"{stem}.{alias.name}"
                add(full if full in modules else stem)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_reader_sees_function_level_and_relative_imports():
    """The reader itself, on imports known to be there: one inside a function (checks imports
    regional_compile only when trainer.compile is on), `from . import x` in a subpackage, `from
    ..config import` two levels up; and a loop made of three modules is one cycle."""
    graph = import_graph()
    assert "cola_train.regional_compile" in graph["cola_train.checks"]
    assert "cola_train.adapters.registry" in graph["cola_train.adapters.io"]
    assert "cola_train.config" in graph["cola_train.data.sampling"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_config_imports_only_leaves():
    """config.py is the bottom of the package: it imports no other cola_train module."""
    assert import_graph()["cola_train.config"] == set()


def test_no_import_cycle():
    """No module imports a module that imports it back, function-level imports included (DESIGN.md)."""
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)
