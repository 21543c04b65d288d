"""Every ```python snippet of the README runs as written: tiny random models and stand-in
processors replace the downloads (``from_pretrained`` / ``pretrained=...``), nothing else changes.
test_every_snippet_is_tested fails when a snippet appears under a heading that no test here runs."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

#: README section heading -> the test that runs its snippets
TESTED = {
    "## Quick start: timm": "test_timm_quick_start_runs",
    "## Quick start: open_clip and Hugging Face vision towers": "test_open_clip_and_siglip_quick_start_runs",
    "## Quick start: Hugging Face LLaVA": "test_llava_quick_start_runs",
    "## Quick start offline: the shipped LLaVA": "test_offline_llava_quick_start_runs",
    "## Quick start: Hugging Face Qwen2-VL / Qwen2.5-VL": "test_qwen2_vl_quick_start_runs",
    "## Quick start: video (LLaVA-OneVision, Qwen2-VL)": "test_video_quick_start_runs",
    "## Learned thresholds": "test_thresholds_snippet_runs",
    "## Adaptive budgets: DToMe": "test_dtome_snippet_runs",
    "## Adaptive budgets for any reducer: Budget and ATP": "test_budget_and_atp_snippet_runs",
    "## Reducers": "test_registry_snippet_runs",
}


def snippets() -> list[tuple[str, str]]:
    """(the heading it sits under, code) of every ```python block of the README, in order."""
    text = README.read_text()
    found = []
    for match in re.finditer(r"```python\n(.*?)```", text, re.S):
        headings = re.findall(r"^#{1,3} .*$", text[:match.start()], re.M)
        found.append((next(h for h in reversed(headings) if h.startswith("## ")), match.group(1)))
    return found


def snippet(heading: str) -> str:
    """The one snippet under ``heading``."""
    codes = [code for where, code in snippets() if where == heading]
    assert len(codes) == 1, f"expected one python snippet under {heading!r}, found {len(codes)}"
    return codes[0]


def test_every_snippet_is_tested():
    headings = [heading for heading, _ in snippets()]
    assert len(headings) >= 7
    untested = sorted(set(headings) - set(TESTED))
    assert not untested, f"README snippets no test runs (add one to tests/test_readme.py): {untested}"
    for name in TESTED.values():
        assert callable(globals()[name])


def test_timm_quick_start_runs(tmp_path, monkeypatch):
    code = snippet("## Quick start: timm")
    assert "pretrained=True" in code
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code.replace("pretrained=True", "pretrained=False"), "README.md", "exec"), namespace)
    trace = namespace["trace"]
    assert trace.tokens()[-2:] == [21, 11]
    assert (tmp_path / "merges.png").stat().st_size > 0
    assert type(namespace["model"]).__name__ == "VisionTransformer"  # removed again after the with-block


def test_llava_quick_start_runs(tmp_path, monkeypatch):
    """The LLaVA quick start with a tiny random LLaVA and a stand-in for the processor."""
    import torch

    from helpers import llava_inputs, tiny_llava

    code = snippet("## Quick start: Hugging Face LLaVA")
    model = tiny_llava("llava")

    class Processor:
        def __call__(self, images, text, return_tensors):
            assert images.size and "<image>" in text and return_tensors == "pt"
            return llava_inputs(model, [([5, 6, 7], [8, 9])])

        def decode(self, ids, skip_special_tokens):
            return " ".join(map(str, ids.tolist()))

    code = re.sub(r"LlavaForConditionalGeneration\.from_pretrained\(.*?\)\n", "tiny_model\n", code)
    code = re.sub(r"AutoProcessor\.from_pretrained\(.*?\)\n", "Processor()\n", code)
    monkeypatch.chdir(tmp_path)  # the photo comes from the package
    namespace = {"tiny_model": model, "Processor": Processor}
    exec(compile(code, "README.md", "exec"), namespace)
    out = namespace["out"]
    assert out.shape[1] == namespace["inputs"]["input_ids"].shape[1] + 30
    llm = __import__("tokred").last_trace(model).tokens("llm")
    assert llm[2] < llm[1] < namespace["inputs"]["input_ids"].shape[1]
    assert isinstance(out, torch.Tensor)


def standin_code(heading: str, model_class: str) -> str:
    """The quick start under ``heading`` with its commented stand-in line in place of the two downloads."""
    code, count = re.subn(rf"model = {model_class}\.from_pretrained\(.*?\)\nprocessor = AutoProcessor\.from_pretrained\(.*?\)\n",
                          "", snippet(heading), flags=re.S)
    assert count == 1
    code, count = re.subn(r"^# (import tokred\.testing; model, processor = tokred\.testing\.\w+\(\))$", r"\1", code,
                          flags=re.M)
    assert count == 1
    return code


def test_video_quick_start_runs(tmp_path, monkeypatch):
    """The video quick start as written, on its offline stand-in (tokred.testing: a tiny random LLaVA-OneVision
    and a real processor): VisionZip keeps 3 dominant + 1 contextual of each frame's 16 tokens."""
    import torch

    import tokred

    code = standin_code("## Quick start: video (LLaVA-OneVision, Qwen2-VL)", "LlavaOnevisionForConditionalGeneration")
    monkeypatch.chdir(tmp_path)  # the photo comes from the package
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out, inputs, model = namespace["out"], namespace["inputs"], namespace["model"]
    assert isinstance(out, torch.Tensor) and out.shape[1] > inputs["input_ids"].shape[1]
    assert inputs["pixel_values_videos"].shape[:2] == (1, 8)
    llm = tokred.last_trace(model).tokens("llm")
    assert llm[0] == inputs["input_ids"].shape[1] - 8 * (16 - 4)  # per frame: 3 dominant + 1 contextual of 16


def test_offline_llava_quick_start_runs(tmp_path, monkeypatch, capsys):
    """As written, on the shipped digits VLM (nothing replaced): the full model reads the scene, each
    reducer shortens the sequence and costs fewer prefill FLOPs."""
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)  # the checkpoint comes from the package
    namespace = {}
    exec(compile(snippet("## Quick start offline: the shipped LLaVA"), "README.md", "exec"), namespace)
    lines = capsys.readouterr().out.splitlines()
    expected = namespace["question"]["answer"].split()
    answers = {line.split(" -> ")[0]: line.split(" -> ")[1].split(";")[0].split() for line in lines if " -> " in line}
    assert list(answers) == ["none", "divprune:keep=0.5/positions=keep", "dart:keep=0.5"]
    assert sum(a == b for a, b in zip(answers["none"], expected)) >= 14  # the trained model reads the grid
    lengths = [eval(line) for line in lines if line.startswith("[")]
    prefill = [float(line.split()[1]) for line in lines if line.strip().startswith("llm_prefill:")]
    assert lengths[0][0] == lengths[0][-1] > lengths[1][0] == lengths[1][-1]  # 64 visual tokens, then 32
    assert lengths[2][0] == lengths[0][0] > lengths[2][2] == lengths[1][0]    # DART: 32 of them from layer 2
    assert prefill[0] > prefill[2] > prefill[1]


def test_qwen2_vl_quick_start_runs(tmp_path, monkeypatch):
    """The Qwen2-VL quick start as written, on its offline stand-in (tokred.testing: a tiny random Qwen2-VL and
    a real processor): DivPrune keeps 4 of the image's 16 merged tokens, FastV fewer from layer 2."""
    import torch

    import tokred

    code = standin_code("## Quick start: Hugging Face Qwen2-VL / Qwen2.5-VL", "Qwen2VLForConditionalGeneration")
    monkeypatch.chdir(tmp_path)  # the photo comes from the package
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out, inputs, model = namespace["out"], namespace["inputs"], namespace["model"]
    assert isinstance(out, torch.Tensor) and out.shape[1] > inputs["input_ids"].shape[1]
    image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert image == 16 and "mm_token_type_ids" in inputs
    llm = tokred.last_trace(model).tokens("llm")
    assert llm[0] == llm[1] == inputs["input_ids"].shape[1] - 12 and llm[2] < llm[1]


def test_open_clip_and_siglip_quick_start_runs(tmp_path, monkeypatch):
    """open_clip's ViT-B-32 and SigLIP as tiny random models, processors that resize to 32 x 32."""
    import torch
    from open_clip.model import CLIP
    from torchvision import transforms
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    code = snippet("## Quick start: open_clip and Hugging Face vision towers")
    torch.manual_seed(0)
    clip = CLIP(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=4, width=48, layers=3, head_width=16),
                text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1)).eval()
    preprocess = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor()])
    config = SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
                                image_size=32, patch_size=4)
    tower = SiglipVisionModel(config).eval()
    processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    code, count = re.subn(r"open_clip\.create_model_and_transforms\(.*?\)\n", "(tiny_clip, None, tiny_preprocess)\n",
                          code)
    assert count == 1
    code = re.sub(r"SiglipVisionModel\.from_pretrained\(.*?\)\n", "tiny_tower\n", code)
    code = re.sub(r"AutoImageProcessor\.from_pretrained\(.*?\)\n", "tiny_processor\n", code)
    assert "from_pretrained" not in code
    monkeypatch.chdir(tmp_path)  # the photo comes from the package, not from the working directory
    namespace = {"tiny_clip": clip, "tiny_preprocess": preprocess, "tiny_tower": tower, "tiny_processor": processor}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["features"].shape == (1, 32)
    assert namespace["pooled"].shape == (1, 48)
    import tokred

    assert tokred.last_trace(tower).tokens()[-1] == 64 - 3 * 8


def test_thresholds_snippet_runs(tmp_path, monkeypatch):
    """As written, on 128 of the training images (two batches) instead of 512, for time."""
    pytest.importorskip("sklearn")
    import tokred.reference

    full = tokred.reference.load_reference_train_data
    monkeypatch.setattr(tokred.reference, "load_reference_train_data", lambda: tuple(t[:128] for t in full()))
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet("## Learned thresholds"), "README.md", "exec"), namespace)
    assert 0 < namespace["ratio"] < 1
    import tokred

    reducers = tokred.reducers_of(namespace["model"])
    assert len(reducers) == 1 and isinstance(reducers[0], tokred.Thresholds)


def test_dtome_snippet_runs(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet("## Adaptive budgets: DToMe"), "README.md", "exec"), namespace)
    assert (tmp_path / "dtome.json").is_file()
    import tokred

    counts = tokred.last_trace(namespace["model"]).layers[-1].tokens_per_image
    assert len(counts) == 90 and len(set(counts)) > 1


def test_budget_and_atp_snippet_runs(tmp_path, monkeypatch):
    """Runs on the digits VLM that ships with tokred and its shipped questions."""
    import tokred

    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet("## Adaptive budgets for any reducer: Budget and ATP"), "README.md", "exec"), namespace)
    (budget,) = tokred.load_reducers(tmp_path / "budget.json")
    assert budget.keep == namespace["budget"]
    assert namespace["atp"].layers == (1, 2, 3) and all(t > -float("inf") for t in namespace["atp"].thresholds)
    counts = namespace["budget"].keeps(namespace["tokens"])
    assert sum(counts) / len(counts) == pytest.approx(0.25) and len(set(counts)) > 1


def test_registry_snippet_runs():
    import tokred

    code = snippet("## Reducers")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    # the values the comments state
    for line in code.splitlines():
        expression, _, comment = line.partition("#")
        if comment.strip().startswith("'"):
            assert repr(eval(expression, namespace)) == comment.strip()
    assert tokred.reducer("dart", layer=2, keep=0.25) == tokred.DART(keep=0.25, layer=2)


def test_reducer_names_and_signatures_are_the_librarys():
    """The README's list_reducers() names are all of them, and every `tokred.Name(k=v, ...)` of the reducers
    table states the dataclass's defaults (DivPrune's positions is None, the model's default)."""
    import ast
    import dataclasses
    import math

    import tokred

    text = README.read_text()
    listed = re.search(r"`tokred\.list_reducers\(\)`: (.*?)\)", text, re.S).group(1)
    assert re.findall(r"`(\w+)`", listed) == tokred.list_reducers()
    rows = re.findall(r"^\| `tokred\.(\w+)\((.*?)\)` \|", text, re.M)
    assert len(rows) >= 18
    for name, params in rows:
        defaults = {f.name: f.default for f in dataclasses.fields(getattr(tokred, name))}
        for keyword in ast.parse(f"f({params})").body[0].value.keywords:
            value = eval(ast.unparse(keyword.value), {"inf": math.inf})
            assert defaults[keyword.arg] == value, f"README: {name}({keyword.arg}={value!r}), default {defaults[keyword.arg]!r}"
