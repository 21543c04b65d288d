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
