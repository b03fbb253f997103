"""The import structure of layers/: one way, no cycles, no task code, no cvxpy on import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ROOT / "layers"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level and inside functions (absolute names)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = "layers"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative (layers has no subpackages): from .mod import y
                mod = f"{package}.{node.module}" if node.module else package
            else:
                mod = node.module or ""
            found.add(mod)
            if mod == "layers":  # from layers import qp_ipm: a submodule, maybe
                found.update(
                    f"layers.{a.name}" for a in node.names if (LAYERS / f"{a.name}.py").exists()
                )
    return found


def _graph() -> dict[str, set[str]]:
    """``layers.<module>`` -> the ``layers`` modules it imports."""
    graph: dict[str, set[str]] = {}
    for path in sorted(LAYERS.glob("*.py")):
        name = "layers" if path.stem == "__init__" else f"layers.{path.stem}"
        graph[name] = {
            m if m in ("layers",) else ".".join(m.split(".")[:2])
            for m in _imports(path)
            if m == "layers" or m.startswith("layers.")
        } - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return [*stack[stack.index(v) :], v]
            if v not in state and (found := visit(v)):
                return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state and (found := visit(u)):
            return found
    return None


def test_graph_sees_function_level_imports(tmp_path):
    src = "import torch\n\ndef f():\n    from layers.qp import qp\n    from . import tv\n"
    (tmp_path / "mod.py").write_text(src)
    assert _imports(tmp_path / "mod.py") == {"torch", "layers.qp", "layers", "layers.tv"}
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_in_layers():
    graph = _graph()
    graph.pop("layers")  # the package re-exports everything; submodules must not import it
    users = sorted(m for m, deps in graph.items() if "layers" in deps)
    assert not users, f"modules importing the package layers itself: {users}"
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_layers_never_imports_tasks():
    bad = {
        path.name: sorted(m for m in _imports(path) if m == "tasks" or m.startswith("tasks."))
        for path in LAYERS.glob("*.py")
    }
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"layers modules importing tasks: {bad}"


@pytest.mark.parametrize("statement", ["import layers", "from layers import neural_sort"])
def test_import_does_not_import_cvxpy(statement):
    code = (
        f"{statement}; import sys; "
        "assert 'cvxpy' not in sys.modules and 'cvxpylayers' not in sys.modules, "
        "sorted(m for m in sys.modules if m.startswith('cvxpy'))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
