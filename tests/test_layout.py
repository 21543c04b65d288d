"""DESIGN.md's layout: signals are a leaf, the core imports no adapter at module level, and no
module of the core imports another in a circle."""
import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "tokred"


def module_imports(path: Path) -> set[str]:
    """tokred modules imported at the top level of ``path`` (not inside functions or TYPE_CHECKING)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tokred"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("tokred"))
    return names


def core_modules() -> dict[str, set[str]]:
    modules = {}
    for path in CORE.rglob("*.py"):
        name = ".".join(("tokred", *path.relative_to(CORE).with_suffix("").parts)).removesuffix(".__init__")
        modules[name] = module_imports(path)
    return modules


def test_signals_is_a_leaf():
    assert module_imports(CORE / "signals.py") == set()


@pytest.mark.parametrize("name", ["tokred.engine", "tokred.decoder", "tokred.plan", "tokred.reducers.base",
                                  "tokred.sequence", "tokred.registry"])
def test_core_modules_import_no_adapter_at_module_level(name):
    assert not any(m.startswith("tokred.adapters") for m in core_modules()[name])


def test_no_import_cycle_among_core_modules():
    graph = {name: {m for m in imports if m in core_modules()} for name, imports in core_modules().items()}
    graph = {n: {m for m in deps if not n.startswith(m + ".") and m != "tokred"} for n, deps in graph.items()}
    state = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join(path + [node])}"
        state[node] = "open"
        for dep in graph.get(node, ()):
            visit(dep, path + [node])
        state[node] = "done"

    for node in graph:
        visit(node, [])
