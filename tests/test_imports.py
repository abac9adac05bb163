"""Every project module imports alone, in a fresh interpreter, and no two modules import each other.

An import cycle works or breaks depending on which module of the cycle a process imports first,
so a test suite that imports modules in one fixed order can miss it. Here each module gets a
fresh interpreter of its own (the custom ops a module registers cannot be registered twice in
one process); a second test reads every module's imports (lazy ones included) and fails on any
cycle among them, whether or not it breaks today.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("benchmarks", "compress", "kernels", "soco_serve")


def project_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            names.append(package if path.stem == "__init__" else f"{package}.{path.stem}")
    return names


MODULES = project_modules()


# Imports one module, then prints every project module it brought in from outside this checkout
# (an editable install of another checkout would fill a module missing here without a word).
IMPORT_ALONE = """
import importlib, sys
from pathlib import Path
importlib.import_module({module!r})
root = Path({root!r})
for name, m in sorted(sys.modules.items()):
    if name.split(".")[0] in {packages!r} and getattr(m, "__file__", None) \\
            and not Path(m.__file__).resolve().is_relative_to(root):
        print(name, m.__file__)
"""


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module):
    code = IMPORT_ALONE.format(module=module, root=str(ROOT), packages=PACKAGES)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == "", f"imported from outside {ROOT}:\n{run.stdout}"


def imports_of(module: str) -> set[str]:
    """The project modules ``module`` imports, at its top or inside a function (a lazy import
    hides a cycle from the import system, not from a reader)."""
    path = ROOT / (module.replace(".", "/") + ("/__init__.py" if module in PACKAGES else ".py"))
    package = module if module in PACKAGES else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = ([base] if node.module else []) + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n in MODULES and n != module)
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:`` (imports for annotations only, never run)."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from (n for orelse in child.orelse for n in [orelse, *_runtime_nodes(orelse)])
            continue
        yield child
        yield from _runtime_nodes(child)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (as the path that closes it), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_among_project_modules():
    cycle = find_cycle({m: imports_of(m) for m in MODULES})
    assert cycle is None, " -> ".join(cycle)
