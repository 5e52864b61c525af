"""The project's modules import each other without circles, and the runtime imports neither train nor export.

The graph is read from the source (every import statement, at module level or inside a function), so a
circle hidden behind a function-level import counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"runtime": "heartseg.runtime", "train": "heartseg.train", "export": "heartseg.export"}


def project_modules() -> dict[str, Path]:
    """Every module of the installed packages, by its dotted name."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that one module imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            candidates = [target, *(f"{target}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c in modules and c != name)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_reader_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


def test_the_reader_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    source = tmp_path / "pipeline.py"
    source.write_text("from .image import Volume\n\ndef f():\n    from .formats import base\n    import json\n")
    modules = {"heartseg.runtime.pipeline": source, "heartseg.runtime.image": source,
               "heartseg.runtime.formats": source, "heartseg.runtime.formats.base": source}
    assert imports_of("heartseg.runtime.pipeline", source, modules) == {
        "heartseg.runtime.image", "heartseg.runtime.formats", "heartseg.runtime.formats.base"}


def test_no_import_circles() -> None:
    assert circles(import_graph()) == []


def test_runtime_imports_neither_train_nor_export() -> None:
    wrong = {name: sorted(d for d in deps if not d.startswith("heartseg.runtime"))
             for name, deps in import_graph().items() if name.startswith("heartseg.runtime")}
    assert {name: deps for name, deps in wrong.items() if deps} == {}
