"""The package's layout, as the code reads it: src/'s import graph (imports inside functions included)
has no cycle, and only the harness and the commands import the harness."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules(src: Path) -> dict[str, Path]:
    modules = {}
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _owner(name: str, modules: dict[str, Path]) -> str:
    """The module ``name`` lives in: itself, or the nearest enclosing package that is a module."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Edges module -> gradkit module it imports, from every ``import`` statement anywhere in the file;
    ``from package import name`` points at ``package.name`` when that is a module."""
    modules = _modules(src)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names]
                targets = [t if t in modules else base for t in targets]
            else:
                continue
            for target in targets:
                if target.split(".")[0] == "gradkit":
                    graph[name].add(_owner(target, modules))
        graph[name].discard(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions_and_relative_ones(tmp_path):
    package = tmp_path / "gradkit"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import b\n")
    (package / "a.py").write_text("import os\n\ndef f():\n    from gradkit.sub.b import g\n    return g\n")
    (package / "sub" / "b.py").write_text("from ..a import f\nfrom gradkit import a\n")
    graph = import_graph(tmp_path)
    assert graph["gradkit.a"] == {"gradkit.sub.b"}
    assert graph["gradkit.sub.b"] == {"gradkit.a"}
    assert graph["gradkit.sub"] == {"gradkit.sub.b"}
    assert cycles(graph) == [["gradkit.a", "gradkit.sub.b"]]


def test_src_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_only_the_harness_and_the_commands_import_the_harness():
    def inside(name: str, package: str) -> bool:
        return name == package or name.startswith(package + ".")

    importers = {
        name for name, targets in import_graph().items() if any(inside(t, "gradkit.train") for t in targets)
    }
    assert importers, "the commands import the harness: the graph should see that"
    assert sorted(n for n in importers if not (inside(n, "gradkit.train") or inside(n, "gradkit.cli"))) == []


def test_every_test_module_has_its_own_base_name():
    """pytest imports test modules by base name (tests/ has no __init__.py): two of one name stop the
    collection of the whole suite."""
    names = [path.name for path in (SRC.parent / "tests").rglob("test_*.py")]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
