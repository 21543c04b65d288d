"""The README's quick start runs as written (with random weights instead of a download)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_timm_quick_start_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("## Quick start: timm"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "pretrained=True" in code
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code.replace("pretrained=True", "pretrained=False"), "README.md", "exec"), namespace)
    trace = namespace["trace"]
    assert trace.tokens()[-2:] == [21, 11]
    assert (tmp_path / "merges.png").stat().st_size > 0
    assert type(namespace["model"]).__name__ == "VisionTransformer"  # removed again after the with-block
