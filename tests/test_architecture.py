"""The shape ARCHITECTURE.md describes, checked: console -> pipelines -> store and nothing
back up; no import cycle inside pipelines/ (modules or subpackages); the console process
never loads the engines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in (REPO / package).rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every module this file imports, at its top or inside a function (a lazy import is
    still a dependency); imports under `if TYPE_CHECKING:` are types only and skipped."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}
    return found


def _graph(package: str) -> dict[str, set[str]]:
    modules = _modules(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(name, path):
            module = imported
            while module and module not in modules:  # `from a.b import c` -> a.b
                module = module.rpartition(".")[0]
            if module and module != name:
                targets.add(module)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_pipelines_modules():
    assert _cycles(_graph("pipelines")) == []


def test_no_import_cycle_between_pipelines_subpackages():
    packages: dict[str, set[str]] = {}
    for name, targets in _graph("pipelines").items():
        top = ".".join(name.split(".")[:2])
        packages.setdefault(top, set()).update(
            ".".join(t.split(".")[:2]) for t in targets if not t.startswith(top))
    assert _cycles(packages) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_dependencies_point_one_way():
    for package, forbidden in (("store", ("pipelines", "console", "textual", "torch")),
                               ("pipelines", ("console", "textual"))):
        for name, path in _modules(package).items():
            bad = {i for i in _imports(name, path) if i.split(".")[0] in forbidden}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_the_console_never_loads_the_engines():
    """Every console module imported in a fresh interpreter: torch, transformers and
    llama_cpp stay out of the process (models run in worker processes)."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import console\n"
        "for m in pkgutil.iter_modules(console.__path__):\n"
        "    if m.name != '__main__':\n"
        "        importlib.import_module('console.' + m.name)\n"
        "print(sorted({'torch', 'transformers', 'llama_cpp'} & set(sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
