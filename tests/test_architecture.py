"""The shape ARCHITECTURE.md describes, checked: console -> pipelines -> store and nothing
back up; no import cycle inside pipelines/ (modules or subpackages), type-only imports
included; the console process never loads the engines; no module over 700 lines and no
function over 100."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import REPO


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in (REPO / package).rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, types: bool = False) -> set[str]:
    """Every module this file imports, at its top or inside a function (a lazy import is
    still a dependency); imports under `if TYPE_CHECKING:` are types only, skipped unless
    `types` (a circle through a type-only import is still a circle to read)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if (not types and isinstance(node, ast.If)
                and "TYPE_CHECKING" in ast.unparse(node.test)):
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


def _graph(package: str, types: bool = False) -> dict[str, set[str]]:
    modules = _modules(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(name, path, types):
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


def _subpackages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for name, targets in graph.items():
        top = ".".join(name.split(".")[:2])
        packages.setdefault(top, set()).update(
            ".".join(t.split(".")[:2]) for t in targets if not t.startswith(top))
    return packages


def test_no_import_cycle_between_pipelines_subpackages():
    assert _cycles(_subpackages(_graph("pipelines"))) == []


def test_no_import_cycle_even_through_type_only_imports():
    """`if TYPE_CHECKING:` imports counted too: modules and subpackages."""
    graph = _graph("pipelines", types=True)
    assert _cycles(graph) == []
    assert _cycles(_subpackages(graph)) == []


def test_type_only_imports_are_seen_when_asked(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                    "    from pipelines.a import B\n", encoding="utf-8")
    assert "pipelines.a" not in _imports("pipelines.m", path)
    assert "pipelines.a" in _imports("pipelines.m", path, types=True)


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


# --- sizes ----------------------------------------------------------------------------------

MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 100
# Modules ("path") and functions ("path:Qualified.name") still over the limits because other
# work is splitting them: printed by the test, and it may only shrink — a listed item that is
# already within the limits fails the test, so take it off when it is split.
PENDING: frozenset[str] = frozenset({
})


def _functions(node: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{child.name}"
            if not isinstance(child, ast.ClassDef):
                yield name, child
            yield from _functions(child, f"{name}.")
        else:
            yield from _functions(child, prefix)


def _too_long() -> dict[str, int]:
    """Every module over MAX_MODULE_LINES and function over MAX_FUNCTION_LINES (def line to
    last line) in console/, pipelines/, store/: its name -> its lines."""
    found: dict[str, int] = {}
    for package in ("console", "pipelines", "store"):
        for path in sorted((REPO / package).rglob("*.py")):
            where = path.relative_to(REPO).as_posix()
            text = path.read_text(encoding="utf-8")
            if len(text.splitlines()) > MAX_MODULE_LINES:
                found[where] = len(text.splitlines())
            for name, node in _functions(ast.parse(text)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found[f"{where}:{name}"] = lines
    return found


def test_the_size_walk_finds_nested_functions():
    tree = ast.parse("class A:\n    def f(self):\n        def g():\n            pass\n")
    assert [name for name, _ in _functions(tree)] == ["A.f", "A.f.g"]


def test_no_module_over_700_lines_and_no_function_over_100():
    found = _too_long()
    print(f"PENDING (still too long, being split): {sorted(PENDING) or 'none'}")
    new = {name: lines for name, lines in found.items() if name not in PENDING}
    assert not new, f"over {MAX_MODULE_LINES} lines (module) or {MAX_FUNCTION_LINES} " \
        f"(function): {new}"
    stale = sorted(PENDING - set(found))
    assert not stale, f"within the limits now, take them off PENDING: {stale}"
