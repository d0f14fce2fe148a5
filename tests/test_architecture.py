"""The shape of the package: imports flow one way (no cycles, nothing imports the package root),
modules stay small, and no solver guesses a method from its name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "pmetlab"
MAX_MODULE_LINES = 400


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    if not base.startswith("pmetlab"):
        return []
    # "from . import x" / "from .editing import targets": x may be a submodule
    return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """module -> pmetlab modules it imports (at module level or inside functions)."""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(mod, path.name == "__init__.py", node)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("pmetlab")]
            graph[mod] |= {t for t in targets if t in files and t != mod}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_the_package_root():
    graph = import_graph()
    offenders = sorted(m for m, deps in graph.items() if "pmetlab" in deps and m != "pmetlab")
    assert offenders == [], f"these modules import the package root (an upward import): {offenders}"


def test_the_import_graph_has_no_cycle():
    graph = {m: {d for d in deps if d != "pmetlab"} for m, deps in import_graph().items() if m != "pmetlab"}
    assert _cycles(graph) == []


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_modules_stay_small(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_MODULE_LINES, f"{path.relative_to(PKG)} has {n} lines (limit {MAX_MODULE_LINES}): split it"


def test_no_method_name_checks_in_the_solver():
    for path in (PKG / "editing").rglob("*.py"):
        text = path.read_text()
        assert ".method ==" not in text and ".method !=" not in text, f"{path.name} branches on a method name"


MAX_FUNCTION_LINES = 60
#: A function may exceed the limit when its first lines say why, in a comment starting with this.
LONG_MARK = "# long:"


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function's body, its signature and docstring not counted (documentation is
    not length)."""
    body = node.body
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(getattr(body[0], "value", None), ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        body = body[1:]
    if not body:
        return 0
    return node.end_lineno - body[0].lineno + 1


def long_functions() -> list[str]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _body_lines(node)
                head = "\n".join(lines[node.lineno - 1 : node.end_lineno][:60])
                if n > MAX_FUNCTION_LINES and LONG_MARK not in head:
                    out.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_functions_stay_short_or_say_why():
    assert long_functions() == []
