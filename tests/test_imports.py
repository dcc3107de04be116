"""The module graph: no import cycles (function-level imports count), and a pure core.

Every ``import`` statement of every module under ``canary_proxy/`` is read with ``ast``:
module-level, function-level, ``TYPE_CHECKING`` and relative ones alike. A cycle hidden in
a function is still a cycle: it only moves the failure from import time to run time.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "canary_proxy"

# The pure core: parsing, routing, reading Ingresses, a rollout's plan, state and analysis,
# the proxy's head rules. No I/O: they are tested with plain tables of cases.
PURE = (
    "canary_proxy.values",
    "canary_proxy.config",
    "canary_proxy.router",
    "canary_proxy.annotations",
    "canary_proxy.ingress",
    "canary_proxy.ingress_annotations",
    "canary_proxy.rollout.plan",
    "canary_proxy.rollout.state",
    "canary_proxy.rollout.analysis",
    "canary_proxy.proxy.headers",  # once the data path is a package
)
IO_MODULES = frozenset(
    {
        "aiohttp",
        "asyncio",
        "httptools",
        "kubernetes",
        "multiprocessing",
        "prometheus_client",
        "select",
        "selectors",
        "socket",
        "ssl",
        "subprocess",
        "threading",
        "urllib.request",
        "uvloop",
        "yaml",
    }
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str) -> Iterator[str]:
    """Every module ``name`` imports, absolute; ``from pkg import sub`` names ``pkg.sub``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            if submodules:
                yield from submodules
            if len(submodules) < len(node.names):
                yield target


def graph() -> dict[str, set[str]]:
    return {name: {t for t in imported(name) if t in MODULES and t != name} for name in MODULES}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walk_sees_every_kind_of_import() -> None:
    edges = graph()
    assert "canary_proxy.rollout.state" in edges["canary_proxy.rollout.controller"]  # relative
    assert "canary_proxy.serve.single" in edges["canary_proxy.cli.serve"]  # inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def closure(name: str, edges: dict[str, set[str]]) -> dict[str, str]:
    """Every module ``name`` reaches, each with the one that imports it first."""
    seen, todo = {name: name}, [name]
    while todo:
        current = todo.pop()
        for nxt in sorted(edges[current] - seen.keys()):
            seen[nxt] = current
            todo.append(nxt)
    return seen


@pytest.mark.parametrize("name", [n for n in PURE if n in MODULES])
def test_the_pure_core_imports_no_io(name: str) -> None:
    edges = graph()
    reached = closure(name, edges)
    offenders = [
        f"{module} imports {target}"
        for module in reached
        for target in imported(module)
        if target in IO_MODULES or target.partition(".")[0] in IO_MODULES
    ]
    assert not offenders, f"{name} reaches I/O: " + "; ".join(offenders)


def test_the_cli_leaves_prometheus_client_unimported_until_serve_chose_its_value_store() -> None:
    """prometheus_client picks its value store when first imported: ``serve --workers N``
    must set PROMETHEUS_MULTIPROC_DIR before that, so parsing the command line imports
    none of the data path or the metrics."""
    code = (
        "import sys, canary_proxy.cli.main as m; m.build_parser(); "
        "print(sorted(n for n in ('prometheus_client', 'canary_proxy.metrics', 'canary_proxy.http1') "
        "if n in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert result.stdout.strip() == "[]", result.stdout
