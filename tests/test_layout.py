"""DESIGN.md's layout: signals are a leaf, the core imports no adapter and no cli (the adapters only by
name, through ``tokred.api.load_adapters``), the cli uses only the public API, and no module of the
core imports another in a circle."""
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


def all_imports(path: Path) -> set[str]:
    """tokred modules imported anywhere in ``path``, inside functions too (``from tokred import x``
    counts as ``tokred.x`` when ``x`` is a module of the package, else as ``tokred``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tokred"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                names.add(sub if module_path(sub) is not None else node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("tokred"))
    return names


def module_path(name: str) -> Path | None:
    """The file of tokred module ``name`` in this tree, or None."""
    parts = name.split(".")[1:]
    for path in (CORE.joinpath(*parts).with_suffix(".py"), CORE.joinpath(*parts, "__init__.py")):
        if parts and path.is_file():
            return path
    return None


def module_name(path: Path) -> str:
    return ".".join(("tokred", *path.relative_to(CORE).with_suffix("").parts)).removesuffix(".__init__")


def is_cli(name: str) -> bool:
    """The command line: ``tokred.cli`` and ``python -m tokred`` (``tokred.__main__``)."""
    return name == "tokred.cli" or name.startswith("tokred.cli.") or name == "tokred.__main__"


def core_modules() -> dict[str, set[str]]:
    return {module_name(path): module_imports(path) for path in CORE.rglob("*.py")}


def test_signals_is_a_leaf():
    assert module_imports(CORE / "signals.py") == set()


@pytest.mark.parametrize("name", ["tokred.engine", "tokred.decoder", "tokred.plan", "tokred.reducers.base",
                                  "tokred.sequence", "tokred.registry"])
def test_core_modules_import_no_adapter_at_module_level(name):
    assert not any(m.startswith("tokred.adapters") for m in core_modules()[name])


def test_core_imports_no_adapter_and_no_cli_anywhere():
    """Not even inside a function: the adapters package is imported by name in tokred.api.load_adapters."""
    for path in CORE.rglob("*.py"):
        if is_cli(module_name(path)):
            continue
        imported = all_imports(path)
        assert not any(m.startswith("tokred.adapters") for m in imported), f"{path.name} imports an adapter"
        assert not any(is_cli(m) for m in imported), f"{path.name} imports the cli"


#: what the cli may import: the top-level ``tokred`` names and the public modules below
PUBLIC_MODULES = {"tokred", "tokred.registry", "tokred.viz", "tokred.reference", "tokred.integrations"}


def test_cli_imports_only_the_public_api():
    paths = [path for path in CORE.rglob("*.py") if is_cli(module_name(path))]
    assert {module_name(path) for path in paths} >= {"tokred.cli", "tokred.cli.bench", "tokred.cli.sweep",
                                                    "tokred.cli.viz", "tokred.__main__"}
    for path in paths:
        private = {m for m in all_imports(path) if m not in PUBLIC_MODULES and not is_cli(m)}
        assert not private, f"{module_name(path)} imports {sorted(private)}, not the public API"


def test_adapters_are_found_through_the_registry():
    import tokred.api

    adapters = tokred.api.registered_adapters()
    assert {a.__module__ for a in adapters} >= {"tokred.adapters.timm_vit", "tokred.adapters.open_clip_vit",
                                                "tokred.adapters.hf_vision", "tokred.adapters.hf_llava"}
    import tokred.adapters

    assert tokred.adapters.find_adapter is tokred.api.find_adapter


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
