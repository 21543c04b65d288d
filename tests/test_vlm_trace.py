"""Each forward's trace and FLOPs describe that forward only (LLaVA, LLaVA-OneVision videos with tower
attention, Qwen2-VL): after a failed forward, after a direct get_image_features call, and for a
text-only prompt after one with images; and return_dict=False gives the unpatched model's tuple."""
import pytest
import torch

import tokred
from helpers import (IMAGE_TOKEN, QWEN_IMAGE, VIDEO_TOKEN, llava_inputs, onevision_video_inputs,
                     qwen_media_inputs, tiny_llava, tiny_onevision, tiny_qwen2_vl)
from test_llava import counted

PROMPTS = [([1, 2, 3], [4, 5, 6, 7, 8]), ([9], [10, 11])]
FAMILIES = {  # reducers at every stage the family has, one needing the tower's attention
    "llava": (tokred.ToMe(r=2), tokred.DivPrune(keep=0.5), tokred.FastV(keep=0.5, layer=2)),
    "onevision_video": (tokred.VisionZip(dominant=4, contextual=2), tokred.FastV(keep=0.5, layer=2)),
    "qwen2_vl": (tokred.VisionZip(dominant=2, contextual=1), tokred.DART(keep=0.5, layer=2)),
}
PLACEHOLDER = {"llava": IMAGE_TOKEN, "onevision_video": VIDEO_TOKEN, "qwen2_vl": QWEN_IMAGE}


@pytest.fixture(scope="module")
def models():
    return {"llava": tiny_llava("llava"), "onevision_video": tiny_onevision(), "qwen2_vl": tiny_qwen2_vl()}


def make_inputs(family, model):
    if family == "llava":
        return llava_inputs(model, PROMPTS)
    if family == "onevision_video":
        return onevision_video_inputs(PROMPTS, frames=2)
    return qwen_media_inputs(PROMPTS, [[("image", [1, 4, 4]), ("video", [2, 4, 6])], [("image", [1, 8, 6])]])


def encode_directly(family, model, inputs):
    """What the Budget docs recommend: the model's own encoder on the images (or videos)."""
    if family == "llava":
        model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
    elif family == "onevision_video":
        model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"], return_dict=True,
                                       vision_feature_layer=-1, vision_feature_select_strategy="full")
    else:
        model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)


def fail_after_encoding(family, model, inputs):
    """A forward that raises after the vision encoder ran: one placeholder too few."""
    ids = inputs["input_ids"].clone()
    ids[0, (ids[0] == PLACEHOLDER[family]).nonzero()[0]] = 5
    with pytest.raises(ValueError, match="placeholder"):
        model(**dict(inputs, input_ids=ids))


@pytest.mark.parametrize("before", ["failed_forward", "get_features"])
@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_flops_count_the_forwards_own_encoding_once(models, family, before):
    """FLOPs and trace after ``before`` equal those of the same forward on a freshly patched model."""
    model = models[family]
    inputs = make_inputs(family, model)
    with tokred.applied(model, *FAMILIES[family]):
        fresh, fresh_trace = tokred.flops(model, **inputs), tokred.last_trace(model)
    with tokred.applied(model, *FAMILIES[family]):
        model(**inputs)
        (fail_after_encoding if before == "failed_forward" else encode_directly)(family, model, inputs)
        report, trace = tokred.flops(model, **inputs), tokred.last_trace(model)
    assert report.layers == fresh.layers and report.stages["vision"] > 0 and report.stages["projector"] > 0
    assert [(r.stage, r.layer, r.tokens_out) for r in trace.layers] == [(r.stage, r.layer, r.tokens_out)
                                                                         for r in fresh_trace.layers]


def text_only():
    """The prompts' text alone, left-padded."""
    rows = [before + after for before, after in PROMPTS]
    width = max(len(r) for r in rows)
    return dict(input_ids=torch.tensor([[0] * (width - len(r)) + r for r in rows]),
                attention_mask=torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]))


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_a_text_only_forward_has_its_own_trace_and_flops(models, family):
    model = models[family]
    inputs, text = make_inputs(family, model), text_only()
    measured = counted(lambda: model(**text, use_cache=True))  # the unpatched model
    with tokred.applied(model, *FAMILIES[family]):
        model(**inputs)
        report = tokred.flops(model, **text, use_cache=True)
        trace = tokred.last_trace(model)
    assert report.total == measured
    assert set(report.stages) == {"llm_prefill"}
    assert {r.stage for r in trace.layers} == {"llm"} and trace.tokens("llm") == [text["input_ids"].shape[1]] * 4


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_generate_counts_its_encoding_once(models, family):
    """generate() encodes before the prefill: the prefill's vision and projector FLOPs are a forward's."""
    model = models[family]
    inputs = make_inputs(family, model)
    with tokred.applied(model, *FAMILIES[family]):
        fresh = tokred.flops(model, **inputs)
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
        report = tokred.flops(model)
    assert [r for r in report.layers if r[0] != "llm_prefill"] == [r for r in fresh.layers if r[0] != "llm_prefill"]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("reduced", [False, True])
@torch.no_grad()
def test_return_dict_false_gives_the_unpatched_tuple(models, family, reduced):
    """Prefill and decode step: the tuple the unpatched model gives, field by field (``to_tuple``)."""
    model = models[family]
    inputs = make_inputs(family, model)
    unpatched = model(**inputs, return_dict=False)
    with tokred.applied(model, *(FAMILIES[family] if reduced else ())):
        out = model(**inputs)
        prefill = model(**inputs, return_dict=False)
        token = out.logits[:, -1:].argmax(dim=-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
        positions = {"position_ids": torch.zeros(4, 2, 1, dtype=torch.long)} if family == "qwen2_vl" else {}
        decode = model(input_ids=token, attention_mask=mask, cache=out.cache, return_dict=False, **positions)
    assert type(prefill) is tuple and [type(v) for v in prefill] == [type(v) for v in unpatched]
    assert torch.equal(prefill[0], out.logits)
    assert type(decode) is tuple and len(decode) == 2 and decode[0].shape == (2, 1, out.logits.shape[-1])
