"""The import layering, read off the source with `ast`: every import counts, including those inside functions,
under `if TYPE_CHECKING:`, in try/except and through `importlib.import_module("...")` with a literal name.

Bottom to top: classification < engine < (server, build_scripts) < benchmarks < appliance. No package imports one
above it or beside it, classification loads no model runtime, only benchmarks imports benchmarks (tests included),
and no two modules import each other, however indirectly. Lazy imports are included because a function-level
import is still a dependency: it only hides the cycle or the upward step until the function runs.

Modules are nodes (a package's `__init__` is one); importing `a.b.c` is an edge to `a.b.c` alone, not to the
parent packages Python also runs, so a package whose `__init__` stays free of imports never closes a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("classification", "engine", "server", "build_scripts", "benchmarks", "appliance")
SKIPPED = (Path("server/generated"),)  # protoc output
MODEL_RUNTIME = ("torch", "transformers", "tensorrt_llm", "vllm", "tritonclient", "grpc")
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "classification": ("engine", "server", "build_scripts", "benchmarks", "appliance", *MODEL_RUNTIME),
    "engine": ("server", "build_scripts", "benchmarks", "appliance"),
    "server": ("build_scripts", "benchmarks", "appliance"),
    "build_scripts": ("server", "benchmarks", "appliance"),
    "benchmarks": ("appliance",),
    "appliance": ("benchmarks",),
    "tests": ("benchmarks",),
}


@dataclass(frozen=True)
class Import:
    path: Path  # the importing file, relative to the repository
    line: int
    statement: str
    source: str  # the importing module
    target: str  # the imported module, absolute

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.statement}"


def module_name(path: Path) -> str:
    parts = path.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def python_files(roots: Iterable[str]) -> list[Path]:
    files = (p.relative_to(REPO) for root in roots for p in sorted((REPO / root).rglob("*.py")))
    return [p for p in files if not any(p.is_relative_to(s) for s in SKIPPED)]


def _base(source: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute module a `from ... import` names, relative levels resolved against `source`."""
    if level == 0:
        return module or ""
    parts = source.split(".") if is_package else source.split(".")[:-1]
    parts = parts[:len(parts) - (level - 1)]
    return ".".join([*parts, module] if module else parts)


def _targets(node: ast.AST, source: str, is_package: bool, known: frozenset[str]) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = _base(source, is_package, node.level, node.module)
        for alias in node.names:
            # `from a.b import c` imports the module a.b.c when there is one, else a name defined in a.b.
            yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
    elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
          and isinstance(node.args[0].value, str) and ast.unparse(node.func) in ("importlib.import_module",
                                                                                 "import_module", "__import__")):
        yield node.args[0].value


def imports_of(path: Path, text: str, known: frozenset[str]) -> list[Import]:
    """Every import in one file's source, wherever it sits in the file."""
    source = module_name(path)
    found: list[Import] = []
    for node in ast.walk(ast.parse(text, filename=str(path))):
        for target in dict.fromkeys(_targets(node, source, path.name == "__init__.py", known)):
            found.append(Import(path, node.lineno, ast.unparse(node), source, target))
    return sorted(found, key=lambda i: (i.line, i.target))


def _top(module: str) -> str:
    return module.split(".")[0]


@cache
def _scan() -> tuple[Import, ...]:
    known = frozenset(module_name(p) for p in python_files(PACKAGES))
    return tuple(i for p in python_files(FORBIDDEN) for i in imports_of(p, (REPO / p).read_text(), known))


def imports_from(layers: tuple[str, ...]) -> list[Import]:
    return [i for i in _scan() if _top(i.source) in layers]


def test_the_scan_sees_every_kind_of_import() -> None:
    text = '''
import engine.checkpoint.synth as s
from . import sibling
from ..gpu import profiles
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    import torch
try:
    from server.triton.launcher import tritonserver_version
except ImportError:
    pass
def later():
    from classification.policy import load_policy
    importlib.import_module("tensorrt_llm.llmapi")
'''
    known = frozenset({"engine.checkpoint.synth", "engine.executors.sibling", "engine.gpu.profiles"})
    found = imports_of(Path("engine/executors/mod.py"), text, known)
    assert [i.target for i in found] == ["engine.checkpoint.synth", "engine.executors.sibling", "engine.gpu.profiles",
                                         "typing", "torch", "server.triton.launcher", "classification.policy",
                                         "tensorrt_llm.llmapi"]
    assert str(found[2]) == "engine/executors/mod.py:4: from ..gpu import profiles"
    assert [i.target for i in imports_of(Path("engine/gpu/__init__.py"), "from . import profiles", known)] == \
        ["engine.gpu.profiles"]


def test_every_product_package_is_scanned() -> None:
    assert {_top(i.source) for i in _scan()} == set(FORBIDDEN)
    assert len(imports_from(PACKAGES)) > 300


@pytest.mark.parametrize("layer", FORBIDDEN)
def test_no_layer_imports_above_or_beside_itself(layer: str) -> None:
    bad = [str(i) for i in imports_from((layer,)) if _top(i.target) in FORBIDDEN[layer]]
    assert not bad, f"{layer} must not import {', '.join(FORBIDDEN[layer])}:\n" + "\n".join(bad)


def _cycles(edges: dict[str, dict[str, Import]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return components


def _loop(edges: dict[str, dict[str, Import]], component: list[str]) -> list[Import]:
    """One shortest cycle through the component's first module, as the imports that close it."""
    start, members = component[0], set(component)
    came: dict[str, Import] = {}
    frontier = [start]
    while frontier and start not in came:
        nxt_frontier = []
        for node in frontier:
            for nxt, imp in sorted(edges.get(node, {}).items()):
                if nxt in members and nxt not in came:
                    came[nxt] = imp
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    path = [came[start]]
    while path[-1].source != start:
        path.append(came[path[-1].source])
    return path[::-1]


def test_no_import_cycles() -> None:
    product = imports_from(PACKAGES)
    modules = {i.source for i in product}
    edges: dict[str, dict[str, Import]] = {}
    for i in product:
        if i.target in modules and i.target != i.source:
            edges.setdefault(i.source, {}).setdefault(i.target, i)
    loops = ["\n".join(f"  {i}" for i in _loop(edges, c)) for c in _cycles(edges)]
    assert not loops, "import cycles (each closed by the imports listed):\n" + "\n\n".join(loops)
