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


def test_llava_quick_start_runs(monkeypatch):
    """The LLaVA quick start with a tiny random LLaVA and a stand-in for the processor."""
    import torch

    from helpers import llava_inputs, tiny_llava

    text = README.read_text()
    section = text[text.index("## Quick start: Hugging Face LLaVA"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    model = tiny_llava("llava")

    class Processor:
        def __call__(self, images, text, return_tensors):
            assert images.size and "<image>" in text and return_tensors == "pt"
            return llava_inputs(model, [([5, 6, 7], [8, 9])])

        def decode(self, ids, skip_special_tokens):
            return " ".join(map(str, ids.tolist()))

    code = re.sub(r"LlavaForConditionalGeneration\.from_pretrained\(.*?\)\n", "tiny_model\n", code)
    code = re.sub(r"AutoProcessor\.from_pretrained\(.*?\)\n", "Processor()\n", code)
    monkeypatch.chdir(README.parent)
    namespace = {"tiny_model": model, "Processor": Processor}
    exec(compile(code, "README.md", "exec"), namespace)
    out = namespace["out"]
    assert out.shape[1] == namespace["inputs"]["input_ids"].shape[1] + 30
    llm = __import__("tokred").last_trace(model).tokens("llm")
    assert llm[2] < llm[1] < namespace["inputs"]["input_ids"].shape[1]
    assert isinstance(out, torch.Tensor)


def test_qwen2_vl_quick_start_runs(monkeypatch):
    """The Qwen2-VL quick start with a tiny random Qwen2-VL and a stand-in for the processor."""
    import torch

    from helpers import qwen_inputs, tiny_qwen2_vl

    text = README.read_text()
    section = text[text.index("## Quick start: Hugging Face Qwen2-VL"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    model = tiny_qwen2_vl()

    class Processor:
        def apply_chat_template(self, messages, add_generation_prompt):
            assert messages[0]["content"][0]["type"] == "image" and add_generation_prompt
            return "<|vision_start|><|image_pad|><|vision_end|>Describe the picture."

        def __call__(self, images, text, return_tensors):
            assert len(images) == 1 and "<|image_pad|>" in text[0] and return_tensors == "pt"
            return qwen_inputs([([5, 6], [7, 8, 9])], [[1, 8, 6]])

        def decode(self, ids, skip_special_tokens):
            return " ".join(map(str, ids.tolist()))

    code = re.sub(r"Qwen2VLForConditionalGeneration\.from_pretrained\(.*?\)\n", "tiny_model\n", code)
    code = re.sub(r"AutoProcessor\.from_pretrained\(.*?\)\n", "Processor()\n", code)
    monkeypatch.chdir(README.parent)
    namespace = {"tiny_model": model, "Processor": Processor}
    exec(compile(code, "README.md", "exec"), namespace)
    out, inputs = namespace["out"], namespace["inputs"]
    assert isinstance(out, torch.Tensor) and out.shape[1] > inputs["input_ids"].shape[1]
    llm = __import__("tokred").last_trace(model).tokens("llm")
    assert llm[2] < llm[1] < inputs["input_ids"].shape[1]
