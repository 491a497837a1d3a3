"""The package's layout: imports run one way between the wings, with no circles.

Every ``import`` and ``from ... import`` in every module of ``ag_kernels`` is read from the
source (those inside functions too, since a lazy import is still a dependency), resolved to the
package's own modules, and checked against the order of the wings:

    commands -> toy -> sampling -> kernels, models        (kernels and models do not import each other)

Modules import down or within their wing, never up; and the module graph has no cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ag_kernels

PACKAGE = Path(ag_kernels.__file__).parent
# A wing may import the wings of lower rank; kernels and models share rank 0 but are independent.
RANK = {"kernels": 0, "models": 0, "sampling": 1, "toy": 2, "commands": 3}
TOP = ("ag_kernels", "ag_kernels.__main__")  # the package's front door and `python -m`: may name any wing


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules():
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known) -> set:
    """The package modules that ``name`` imports (a ``from pkg import sub`` names the submodule)."""
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
        else:
            continue
        for t in targets:
            # The deepest package module the target names (an attribute import names its module).
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph():
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _wing(name: str):
    parts = name.split(".")
    if name in TOP:
        return None
    if parts[1] == "_C":
        return "kernels"
    return parts[1]


def _ancestors(name: str):
    """Packages whose __init__ runs before ``name`` (importing a module imports its parents)."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_every_module_is_in_a_wing():
    stray = [m for m in _modules() if m not in TOP and _wing(m) not in RANK]
    assert not stray, f"modules outside the wings {sorted(RANK)}: {stray}"


def test_imports_run_down_the_wings():
    upward = []
    for name, deps in _graph().items():
        wing = _wing(name)
        if wing is None:
            continue
        for dep in deps:
            other = _wing(dep)
            if other is None:
                upward.append(f"{name} imports the package front door {dep} (import the wing instead)")
            elif other != wing and not RANK[other] < RANK[wing]:
                upward.append(f"{name} ({wing}) imports {dep} ({other})")
    assert not upward, "imports against the wing order:\n" + "\n".join(sorted(upward))


def _cycle(graph):
    """A cycle of the graph as a list of modules, or None (iterative depth-first search)."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    for root in sorted(graph):
        if color[root] != WHITE:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        color[root] = GREY
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                color[node] = BLACK
                stack.pop()
                path.pop()
            elif color.get(nxt, BLACK) == GREY:
                return path[path.index(nxt):] + [nxt]
            elif color.get(nxt) == WHITE:
                color[nxt] = GREY
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
    return None


def test_no_import_circles():
    # An edge to one's own parent package is left out: Python runs a package's __init__ before any
    # of its modules anyway, and an __init__ importing its own modules is the usual way to export.
    graph = {name: {d for d in deps if d not in _ancestors(name)} for name, deps in _graph().items()}
    cycle = _cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_checker_finds_circles_and_upward_imports():
    """The checks above can fail: a made-up graph with a circle and an upward import is caught."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert _wing("ag_kernels.kernels.ops") == "kernels" and not RANK["sampling"] < RANK["kernels"]


def test_import_ag_kernels_does_not_import_torch():
    code = ("import sys, ag_kernels; assert 'torch' not in sys.modules, 'torch imported'; "
            "ag_kernels.load_net; assert 'ag_kernels.kernels' not in sys.modules; "
            "ag_kernels.edm_sampler; assert 'ag_kernels.kernels' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_public_api_resolves():
    for name in ag_kernels.__all__:
        assert getattr(ag_kernels, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ag_kernels.nope  # noqa: B018
