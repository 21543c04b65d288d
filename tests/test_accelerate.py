"""accelerate hooks (``device_map``, ``accelerate.dispatch_model``): tokred patches under them, with
the same output and trace as without, and ``remove`` leaves every hook exactly as it was."""
import accelerate
import pytest
import torch
from transformers import (AutoModel, AutoModelForImageTextToText, CLIPVisionConfig, CLIPVisionModel,
                          SiglipVisionConfig, SiglipVisionModel)

import tokred
from helpers import llava_inputs, qwen_inputs, tiny_llava, tiny_qwen2_vl, tiny_vit
from test_open_clip import tiny_clip
from tiny_families import tiny_eva, tiny_torchvision_vit

TOWER = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3, image_size=32,
             patch_size=4)


def hf_tower(model_class, config_class):
    torch.manual_seed(0)
    return model_class(config_class(**TOWER)).eval()


#: vision family: (builder, run on images -> the tensor to compare)
VISION = {
    "timm_vit": (tiny_vit, lambda m, x: m(x)),
    "eva": (tiny_eva, lambda m, x: m(x)),
    "open_clip": (tiny_clip, lambda m, x: m.encode_image(x)),
    "hf_clip": (lambda: hf_tower(CLIPVisionModel, CLIPVisionConfig), lambda m, x: m(pixel_values=x).pooler_output),
    "hf_siglip": (lambda: hf_tower(SiglipVisionModel, SiglipVisionConfig),
                  lambda m, x: m(pixel_values=x).pooler_output),
    "torchvision_vit": (tiny_torchvision_vit, lambda m, x: m(x)),
}
VLMS = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
PROMPTS = [([1, 2, 3], [4, 5, 6, 7, 8]), ([9], [10, 11])]
SUPPRESS = [2, 90, 91, 92, 93, 97, 98]  # media and end-of-sequence tokens of both tiny families


def build_vlm(kind):
    return tiny_qwen2_vl(kind) if kind.startswith("qwen") else tiny_llava(kind.replace("llava_onevision", "onevision"))


def vlm_inputs(kind, model):
    return qwen_inputs(PROMPTS, [[1, 4, 4], [1, 4, 6]]) if kind.startswith("qwen") else llava_inputs(model, PROMPTS)


def vlm_reducers(kind):
    language = (tokred.DivPrune(keep=0.75), tokred.FastV(keep=0.5, layer=2))
    return (tokred.ToMe(r=2),) + language if kind == "llava" else language  # LLaVA-1.5: its tower too


def hook_state(model):
    """Per hooked module, the objects accelerate installed and every instance attribute's name."""
    return {name: (m.__dict__["_hf_hook"], m.__dict__["forward"], m.__dict__["_old_forward"], set(m.__dict__))
            for name, m in model.named_modules() if "_hf_hook" in m.__dict__}


def assert_same_state(model, before):
    after = hook_state(model)
    assert after.keys() == before.keys()
    for name, (hook, forward, old_forward, attributes) in before.items():
        now = after[name]
        assert now[0] is hook and now[1] is forward and now[2] is old_forward and now[3] == attributes, name


def count_pre_forward(model):
    """Count the calls of every hook's pre_forward: a list that grows by one per call."""
    calls = []
    for module in model.modules():
        if "_hf_hook" in module.__dict__:
            hook = module._hf_hook
            hook.pre_forward = (lambda original: lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
                                )(hook.pre_forward)
    return calls


def check_under_hooks(plain, hooked, run, reducers):
    """``hooked`` (under accelerate hooks) reduces as ``plain`` does, keeps running its hooks, and
    after ``remove`` is the hooked unpatched model again, hooks and all."""
    with torch.no_grad():
        unreduced = run(hooked)
    before = hook_state(hooked)  # after a first forward: transformers marks a model on its first one
    assert before, "no accelerate hook was installed"
    calls = count_pre_forward(hooked)
    with torch.no_grad(), tokred.applied(plain, *reducers):
        want, want_trace, want_flops = run(plain), tokred.last_trace(plain), tokred.flops(plain)
    assert not torch.equal(torch.as_tensor(want), torch.as_tensor(unreduced))  # the reduction shows
    with torch.no_grad(), tokred.applied(hooked, *reducers):
        got = run(hooked)
        assert calls, "the hook did not run while patched"
        assert tokred.last_trace(hooked).layers == want_trace.layers
        assert tokred.flops(hooked) == want_flops
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert_same_state(hooked, before)
    ran = len(calls)
    with torch.no_grad():
        torch.testing.assert_close(run(hooked), unreduced, atol=0, rtol=0)
    assert len(calls) > ran


@pytest.mark.parametrize("family", VISION)
def test_vision_families_under_dispatch_model(family, images):
    build, run = VISION[family]
    hooked = accelerate.dispatch_model(build(), {"": "cpu"}, force_hooks=True)
    check_under_hooks(build(), hooked, lambda m: run(m, images), (tokred.ToMe(r=8),))


def from_pretrained(auto_class, path):
    """``path`` loaded with ``device_map={"": "cpu"}``, then dispatched on that map with hooks forced
    (transformers hooks only a map over several devices: this gives the layout those have)."""
    model = auto_class.from_pretrained(path, device_map={"": "cpu"}).eval()
    return accelerate.dispatch_model(model, {"": "cpu"}, force_hooks=True)


@pytest.mark.parametrize("model_class,config_class", [(CLIPVisionModel, CLIPVisionConfig),
                                                      (SiglipVisionModel, SiglipVisionConfig)])
def test_hf_tower_loaded_with_a_device_map(model_class, config_class, images, tmp_path):
    plain = hf_tower(model_class, config_class)
    plain.save_pretrained(tmp_path)
    hooked = from_pretrained(AutoModel, tmp_path)
    check_under_hooks(plain, hooked, lambda m: m(pixel_values=images).pooler_output, (tokred.ToMe(r=8),))


@pytest.mark.parametrize("kind", VLMS)
def test_vlms_under_dispatch_model(kind):
    plain = build_vlm(kind)
    inputs = vlm_inputs(kind, plain)
    hooked = accelerate.dispatch_model(build_vlm(kind), {"": "cpu"}, force_hooks=True)
    check_under_hooks(plain, hooked, lambda m: m(**inputs).logits, vlm_reducers(kind))


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_tower_attention_reaches_a_reducer_under_dispatch_model(kind):
    """The tower attention VisionZip ranks by rides on the encoder's output, which the hooks pass on."""
    plain = build_vlm(kind)
    inputs = vlm_inputs(kind, plain)
    hooked = accelerate.dispatch_model(build_vlm(kind), {"": "cpu"}, force_hooks=True)
    check_under_hooks(plain, hooked, lambda m: m(**inputs).logits, (tokred.VisionZip(dominant=2, contextual=1),))


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
def test_vlm_loaded_with_a_device_map_generates(kind, tmp_path):
    plain = build_vlm(kind)
    inputs = vlm_inputs(kind, plain)
    plain.save_pretrained(tmp_path)
    hooked = from_pretrained(AutoModelForImageTextToText, tmp_path)
    check_under_hooks(plain, hooked, lambda m: m(**inputs).logits, vlm_reducers(kind))

    def generate(m):
        return m.generate(**inputs, max_new_tokens=4, do_sample=False, suppress_tokens=SUPPRESS, pad_token_id=0)

    before = hook_state(hooked)
    with tokred.applied(plain, *vlm_reducers(kind)), tokred.applied(hooked, *vlm_reducers(kind)):
        assert torch.equal(generate(hooked), generate(plain))
    assert_same_state(hooked, before)


def test_an_unknown_instance_forward_is_refused_untouched(images):
    model = tiny_vit()
    block = model.blocks[1]
    block.forward = lambda x, **kwargs: x
    attributes = {name: dict(m.__dict__) for name, m in model.named_modules()}
    with pytest.raises(ValueError, match="'blocks.1' .*instance-level forward"):
        tokred.apply(model, tokred.ToMe(r=8))
    assert {name: dict(m.__dict__) for name, m in model.named_modules()} == attributes
    assert type(block).__name__ == "Block"
