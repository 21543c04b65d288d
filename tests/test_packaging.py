"""adapters/ installs as tokred.adapters, never as a top-level `adapters` package."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_adapters_is_a_subpackage_only(tmp_path):
    code = ("import importlib.util, tokred.adapters; spec = importlib.util.find_spec('adapters'); "
            "print(tokred.adapters.__name__); print(spec.origin if spec else None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    name, origin = out.stdout.split()
    assert name == "tokred.adapters"
    assert origin == "None" or not Path(origin).resolve().is_relative_to(REPO)


# dependencies declared exactly as imported ----------------------------------------------------------
#: import name -> distribution name, for every third-party package tokred/ and adapters/ import
DISTRIBUTIONS = {"torch": "torch", "torchvision": "torchvision", "timm": "timm", "PIL": "pillow", "numpy": "numpy",
                 "tqdm": "tqdm", "matplotlib": "matplotlib", "safetensors": "safetensors",
                 "sklearn": "scikit-learn", "transformers": "transformers", "open_clip": "open_clip_torch",
                 "lmms_eval": "lmms-eval", "accelerate": "accelerate", "tokenizers": "tokenizers"}
#: extras that `dev` does not hold: tested in a venv of their own (`lmms`: `make test-lmms`)
SEPARATE_EXTRAS = ("lmms",)


def _project() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    import re

    return re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0).lower()


def _imported() -> set[str]:
    import ast

    found = set()
    for folder in ("tokred", "adapters"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found.update(alias.name.partition(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.partition(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name not in ("tokred", "__future__")}


def test_dependencies_are_declared_exactly_as_imported():
    project = _project()
    imported = _imported()
    unknown = imported - set(DISTRIBUTIONS)
    assert not unknown, f"imports with no entry in DISTRIBUTIONS (declare them in pyproject.toml too): {unknown}"
    core = {_name(r) for r in project["dependencies"]}
    extras = {name: {_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    needed = {DISTRIBUTIONS[name] for name in imported}
    assert core <= needed, f"declared but imported nowhere: {core - needed}"
    optional = set().union(*(reqs for name, reqs in extras.items() if name != "dev"))
    assert needed <= core | optional, f"imported but not declared: {needed - core - optional}"
    assert extras["sweep"] == {"scikit-learn"} and extras["hf"] == {"transformers", "tokenizers"}
    assert extras["dev"] >= set().union(*(reqs for name, reqs in extras.items() if name not in ("dev", *SEPARATE_EXTRAS)))


def test_every_asset_is_package_data():
    """assets/ is the package tokred.assets, each of its folders a data package of its own whose files are
    all package data (the top level lists its files by name)."""
    import tomllib

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["tokred.assets"] == "assets"
    data = setuptools["package-data"]
    assert sorted(data["tokred.assets"]) == sorted(path.name for path in (REPO / "assets").iterdir() if path.is_file())
    folders = [path for path in (REPO / "assets").rglob("*") if path.is_dir()]
    packages = {"tokred.assets." + ".".join(path.relative_to(REPO / "assets").parts) for path in folders}
    assert packages | {"tokred.assets"} <= set(setuptools["packages"])
    assert all(data[package] == ["*"] for package in packages)
