"""The layers and what may import what, read from the source of every module (function-level imports included):

- strategies import nothing from the proxy or the tools: a strategy reaches engines only through its context;
- the proxy imports nothing from the tools;
- the wire format (proxy/wire), the runs (proxy/runs) and the backends (proxy/backends) import nothing from the
  HTTP layer (app, passthrough, streaming, openapi, access_log, routing, registry, replicas, ...): of the proxy they
  import only each other and the modules every layer shares (errors, config, traces);
- no module imports itself through others (no import circles);
- the run modules (proxy/runs) stay small: at most 400 lines;
- and no function of the proxy, the strategies or the tools is over 80 lines.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE_FOLDERS = {"proxy": "ttc_proxy.proxy", "strategies": "ttc_proxy.strategies", "tools": "ttc_proxy.tools"}
BELOW_HTTP = ("ttc_proxy.proxy.wire", "ttc_proxy.proxy.runs", "ttc_proxy.proxy.backends")
SHARED = frozenset({"ttc_proxy.proxy.errors", "ttc_proxy.proxy.config", "ttc_proxy.proxy.traces"})


def source_modules() -> dict[str, Path]:
    """Every module of the project by its dotted name (a package by its own name, for its __init__.py)."""
    modules: dict[str, Path] = {}
    for folder, package in SOURCE_FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


MODULES = source_modules()


def imported_names(module: str, path: Path) -> Iterator[str]:
    """The project modules this one imports anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # `from .runs import run` imports the submodule; `from .errors import X` the module itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target.startswith("ttc_proxy."):
                yield _known(target)


def _known(name: str) -> str:
    """The longest project module that is `name` or a package holding it."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


IMPORTS = {module: sorted(set(imported_names(module, path))) for module, path in MODULES.items()}


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_import_graph_is_read_from_the_source():
    assert "ttc_proxy.proxy.runs.context" in MODULES and "ttc_proxy.strategies.framework" in MODULES
    assert "ttc_proxy.strategies.framework" in IMPORTS["ttc_proxy.proxy.runs.context"]
    assert "ttc_proxy.proxy.runs.state" in IMPORTS["ttc_proxy.proxy.runs.context"]  # a relative import resolved


@pytest.mark.parametrize("module", [m for m in MODULES if in_package(m, "ttc_proxy.strategies")])
def test_strategies_import_nothing_from_the_proxy_or_the_tools(module):
    assert [m for m in IMPORTS[module]
            if in_package(m, "ttc_proxy.proxy") or in_package(m, "ttc_proxy.tools")] == []


@pytest.mark.parametrize("module", [m for m in MODULES if in_package(m, "ttc_proxy.proxy")])
def test_the_proxy_imports_nothing_from_the_tools(module):
    assert [m for m in IMPORTS[module] if in_package(m, "ttc_proxy.tools")] == []


@pytest.mark.parametrize("module", [m for m in MODULES if any(in_package(m, p) for p in BELOW_HTTP)])
def test_wire_runs_and_backends_import_nothing_from_the_http_layer(module):
    assert [m for m in IMPORTS[module] if in_package(m, "ttc_proxy.proxy") and m not in SHARED
            and not any(in_package(m, p) for p in BELOW_HTTP)] == []


def test_the_wire_format_imports_nothing_above_it():
    for module in (m for m in MODULES if in_package(m, "ttc_proxy.proxy.wire")):
        assert [m for m in IMPORTS[module] if m not in ("ttc_proxy.proxy.errors",) and not
                in_package(m, "ttc_proxy.proxy.wire")] == [], module


def import_circles() -> list[list[str]]:
    """Every strongly connected set of two or more modules (or a module importing itself), Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in IMPORTS.get(module, []):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            members = []
            while True:
                member = stack.pop()
                members.append(member)
                if member == module:
                    break
            if len(members) > 1 or module in IMPORTS.get(module, []):
                circles.append(sorted(members))

    for module in MODULES:
        if module not in index:
            visit(module)
    return circles


def test_there_are_no_import_circles():
    # A package's __init__ importing its own submodules is not a circle unless a submodule imports the package.
    assert import_circles() == []


def test_a_circle_would_be_found():
    IMPORTS["ttc_proxy.proxy.errors"].append("ttc_proxy.proxy.app")
    try:
        assert any("ttc_proxy.proxy.app" in c and "ttc_proxy.proxy.errors" in c for c in import_circles())
    finally:
        IMPORTS["ttc_proxy.proxy.errors"].remove("ttc_proxy.proxy.app")


@pytest.mark.parametrize("module", [m for m in MODULES if in_package(m, "ttc_proxy.proxy.runs")])
def test_the_run_modules_stay_small(module):
    # One concept a module.
    assert len(MODULES[module].read_text().splitlines()) <= 400


MAX_FUNCTION_LINES = 80


def long_functions(source: str) -> list[tuple[str, int]]:
    """(name, lines) of every function or method in `source` longer than MAX_FUNCTION_LINES, nested ones too."""
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


@pytest.mark.parametrize("module", [m for m in MODULES if in_package(m, "ttc_proxy.proxy")
                                    or in_package(m, "ttc_proxy.strategies") or in_package(m, "ttc_proxy.tools")])
def test_no_function_is_over_80_lines(module):
    assert long_functions(MODULES[module].read_text()) == []


def test_a_long_function_would_be_found():
    def function(lines: int) -> str:  # a def line, then lines - 1 statements
        return "def f():\n" + "".join(f"    x = {i}\n" for i in range(lines - 1))

    assert long_functions(function(MAX_FUNCTION_LINES)) == []
    assert long_functions(function(MAX_FUNCTION_LINES + 1)) == [("f", MAX_FUNCTION_LINES + 1)]
