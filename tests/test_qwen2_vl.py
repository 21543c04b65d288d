"""The Qwen2-VL / Qwen2.5-VL adapter on tiny models built in code: identity, cached == uncached
generation, batch == one by one with images of different sizes (and, ``videos``, an image and
videos of different lengths in one batch), M-RoPE positions, FLOPs, guards and bad input."""
import copy

import pytest
import torch
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tokred
from helpers import (QWEN_END, QWEN_IMAGE, QWEN_START, QWEN_VIDEO, next_step, qwen_inputs, qwen_media_inputs,
                     stripped, tiny_qwen2_vl)
from tokred.decoder import CompatibilityError

KINDS = ["qwen2_vl", "qwen2_5_vl"]
PROMPTS = [([5, 6, 7], [8, 9, 10, 11]), ([12], [13, 14])]
GRIDS = [[1, 8, 6], [1, 4, 4]]  # 12 and 4 merged tokens: images of different sizes
SUPPRESS = [2, QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END]  # 2: end of sequence
#: per sample, its images and videos ([t, h, w] in patches): images of different sizes, or an image
#: and a video in one prompt beside a longer video (2 and 3 temporal patches)
MEDIA = {"images": [[("image", grid)] for grid in GRIDS],
         "videos": [[("image", [1, 4, 4]), ("video", [2, 4, 6])], [("video", [3, 4, 4])]]}

REDUCERS = {
    "divprune": (tokred.DivPrune(keep=0.5),),
    "random": (tokred.Random(keep=0.5, stage="projector"),),
    "pool": (tokred.Pool(stride=2, stage="projector"),),
    "dart": (tokred.DART(keep=0.5, layer=2, image_pivots=1, text_pivots=2),),
    "fastv": (tokred.FastV(keep=3, layer=1),),
    "adjacent": (tokred.AdjacentMerge(keep=0.5, layer=2),),
    "composed": (tokred.DivPrune(keep=0.75), tokred.FastV(keep=0.5, layer=2)),
    "pool_temporal": (tokred.Pool(stride=2, stage="projector", temporal_stride=2),),
    "dycoke": (tokred.DyCoke(keep=0.5, window=2),),
    "uniform": (tokred.Uniform(keep=2),),
    "visionzip": (tokred.VisionZip(dominant=2, contextual=1),),
}
VIDEO_ONLY = ("pool_temporal", "dycoke", "uniform")


def make_inputs(media, prompts=PROMPTS, seed=0):
    return qwen_media_inputs(prompts, MEDIA[media], seed=seed)


def single_inputs(media, batch, i):
    """Sample i of ``batch`` alone: its prompt with its slices of the packed pixels."""
    single = qwen_media_inputs([PROMPTS[i]], [MEDIA[media][i]])
    for kind, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        sizes = [[t * h * w for k, (t, h, w) in items if k == kind] for items in MEDIA[media]]
        start = sum(sum(s) for s in sizes[:i])
        if sizes[i]:
            single[pixels] = batch[pixels][start:start + sum(sizes[i])]
    return single


def media_cases(names):
    return [(media, name) for media in MEDIA for name in names if media == "videos" or name not in VIDEO_ONLY]


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_qwen2_vl(kind) for kind in KINDS}


def greedy_cached(model, inputs, steps):
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, suppress_tokens=SUPPRESS, pad_token_id=0)
    return out[:, inputs["input_ids"].shape[1]:]


def greedy_uncached(model, inputs, steps):
    """Greedy decoding by re-running the model on the whole sequence at every step (no cache)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    prompt_length = ids.shape[1]
    for _ in range(steps):
        call = dict(inputs, input_ids=ids, attention_mask=mask,
                    mm_token_type_ids=(ids == QWEN_IMAGE).int() + 2 * (ids == QWEN_VIDEO).int())
        logits = model(**call, use_cache=False, prompt_length=prompt_length).logits[:, -1]
        logits[:, SUPPRESS] = -torch.inf
        ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids[:, prompt_length:]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("media", list(MEDIA))
@pytest.mark.parametrize("reducers", [(), (tokred.DivPrune(keep=1.0),), (tokred.Random(keep=1.0, stage="projector"),),
                                      (tokred.DART(keep=1.0),), (tokred.FastV(keep=1.0),),
                                      (tokred.DyCoke(keep=1.0),), (tokred.Uniform(keep=1.0),)], ids=str)
@torch.no_grad()
def test_removing_nothing_is_the_unpatched_model(models, kind, media, reducers):
    model = models[kind]
    inputs = make_inputs(media)
    reference = model(**inputs).logits
    reference_tokens = greedy_cached(model, inputs, 4)
    with tokred.applied(model, *reducers):
        assert torch.equal(model(**inputs).logits, reference)
        assert torch.equal(greedy_cached(model, inputs, 4), reference_tokens)
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("media,name", media_cases(REDUCERS))
@torch.no_grad()
def test_cached_generation_equals_uncached(models, kind, media, name):
    model = models[kind]
    inputs = make_inputs(media)
    with tokred.applied(model, *REDUCERS[name]):
        cached = greedy_cached(model, inputs, 5)
        assert torch.equal(cached, greedy_uncached(model, inputs, 5))
        assert tokred.last_trace(model).tokens("llm")[-1] < inputs["input_ids"].shape[1] + 4


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("media,name", media_cases(["divprune", "dart", "fastv", "adjacent", "composed",
                                                    "pool_temporal", "dycoke", "visionzip"]))
@torch.no_grad()
def test_batch_equals_one_by_one(models, kind, media, name):
    model = models[kind]
    batch = make_inputs(media, seed=3)
    with tokred.applied(model, *REDUCERS[name]):
        logits = model(**batch).logits[:, -1]
        tokens = greedy_cached(model, batch, 4)
        for i in range(len(PROMPTS)):
            single = single_inputs(media, batch, i)
            torch.testing.assert_close(model(**single).logits[:, -1], logits[i:i + 1], atol=1e-5, rtol=1e-5)
            assert torch.equal(greedy_cached(model, single, 4), tokens[i:i + 1])


def layer_positions(model, inputs, steps=1):
    """The rotary positions each decoder layer used (cos of the first M-RoPE frequency of each axis
    section identifies t, h and w) — recorded from what the language model's rotary embedding got."""
    seen = []
    rotary = model.model.language_model.rotary_emb

    def hook(module, args):
        seen.append(args[1].clone())

    handle = rotary.register_forward_pre_hook(hook)
    try:
        greedy_cached(model, inputs, steps + 1)
    finally:
        handle.remove()
    return seen


@torch.no_grad()
def test_kept_tokens_keep_their_3d_positions(models):
    model = models["qwen2_vl"]
    inputs = qwen_inputs([PROMPTS[0]], [GRIDS[0]])
    full, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                         image_grid_thw=inputs["image_grid_thw"])
    with tokred.applied(model, tokred.DivPrune(keep=4)):
        seen = layer_positions(model, inputs)
    prefill, decode = seen[0], seen[1]
    text = inputs["input_ids"][0] != QWEN_IMAGE
    image = (~text).nonzero().squeeze(1)
    assert prefill.shape == (3, 1, int(text.sum()) + 4)
    # the text keeps its original positions (the text after the image starts where it did unreduced)
    assert torch.equal(prefill[:, 0, -5:], full[:, 0, text][:, -5:])
    assert torch.equal(prefill[:, 0, :4], full[:, 0, :4])
    # every visual survivor is one of the image's original (t, h, w) triples
    image_positions = {tuple(full[:, 0, i].tolist()) for i in image}
    start = len(PROMPTS[0][0]) + 1
    assert all(tuple(prefill[:, 0, start + j].tolist()) in image_positions for j in range(4))
    # the next token continues after the original last position, as transformers' generate does
    assert decode[:, 0, -1].tolist() == [int(full.max()) + 1] * 3


@torch.no_grad()
def test_llm_stage_keeps_positions_and_sets_rope_deltas(models):
    model = models["qwen2_vl"]
    inputs = qwen_inputs([PROMPTS[0]], [GRIDS[0]])
    full, deltas = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              image_grid_thw=inputs["image_grid_thw"])
    with tokred.applied(model, tokred.FastV(keep=3, layer=2)):
        model(**inputs)
    kept_length = inputs["input_ids"].shape[1] - 12 + 3
    assert model.model.rope_deltas.tolist() == [[int(full.max()) + 1 - kept_length]]


def counted(fn):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("media,name", media_cases(["none", "divprune", "dart", "fastv", "composed", "dycoke"]))
@torch.no_grad()
def test_flops_match_the_flop_counter(models, kind, media, name):
    model = models[kind]
    inputs = make_inputs(media)
    reducers = () if name == "none" else REDUCERS[name]
    with tokred.applied(model, *reducers):
        out = None

        def prefill():
            nonlocal out
            out = model(**inputs, use_cache=True)

        measured = counted(prefill)
        report = tokred.flops(model)
        assert report.total == measured
        assert report.stages["vision"] > 0 and report.stages["projector"] > 0
        token, mask = next_step(inputs, out)
        step = counted(lambda: model(input_ids=token, attention_mask=mask, cache=out.cache,
                                     position_ids=torch.zeros(4, 2, 1, dtype=torch.long)))
        assert report.decode_per_token == step


# guards and bad input --------------------------------------------------------------------------------

@torch.no_grad()
def test_images_without_mm_token_type_ids_are_refused(models):
    model = models["qwen2_vl"]
    inputs = qwen_inputs(PROMPTS, GRIDS)
    del inputs["mm_token_type_ids"]
    with tokred.applied(model, tokred.DivPrune(keep=0.5)):
        with pytest.raises(ValueError, match="needs mm_token_type_ids"):
            model.generate(**inputs, max_new_tokens=2)


def test_renumber_is_refused(models):
    model = models["qwen2_vl"]
    for reducer in (tokred.DivPrune(keep=0.5, positions="renumber"), tokred.DART(keep=0.5, positions="renumber")):
        with pytest.raises(ValueError, match="renumber' has no faithful meaning"):
            tokred.apply(model, reducer)
        assert "forward" not in model.__dict__


@pytest.mark.parametrize("reducers,error,message", [
    ((tokred.ToMe(r=2),), ValueError, "packed sequence"),
    ((tokred.DART(keep=0.5, layer=4),), ValueError, "layer=4, but the language model has 4 decoder layers"),
    ((tokred.DivPrune(keep=0.5), tokred.Random(keep=0.5, stage="projector")), ValueError, "two reducers"),
], ids=["vision", "layer", "two-projector"])
def test_bad_reductions_leave_the_model_untouched(models, reducers, error, message):
    model = models["qwen2_vl"]
    inputs = qwen_inputs(PROMPTS, GRIDS)
    with torch.no_grad():
        reference = model(**inputs).logits
        with pytest.raises(error, match=message):
            tokred.apply(model, *reducers)
        assert "forward" not in model.__dict__
        assert torch.equal(model(**inputs).logits, reference)


@torch.no_grad()
def test_decode_on_a_reduced_cache_without_bookkeeping_is_refused(models):
    model = models["qwen2_5_vl"]
    inputs = qwen_inputs(PROMPTS, GRIDS)
    with tokred.applied(model, tokred.DART(keep=0.5, layer=2)):
        out = model(**inputs, use_cache=True)
        plain = stripped(out.cache)
        token, mask = next_step(inputs, out)
        with pytest.raises(CompatibilityError, match=f"bookkeeping.*transformers {transformers.__version__}"):
            model(input_ids=token, attention_mask=mask, cache=plain)


@torch.no_grad()
def test_deepcopy_runs_the_copy(models):
    model = models["qwen2_vl"]
    inputs = qwen_inputs(PROMPTS, GRIDS)
    with tokred.applied(model, tokred.DivPrune(keep=0.5)):
        expected = model(**inputs).logits
        clone = copy.deepcopy(model)
        clone.lm_head.weight.data.zero_()
        assert torch.equal(clone(**inputs).logits, torch.zeros_like(expected))
        assert torch.equal(model(**inputs).logits, expected)


def long_video_inputs(kind, after):
    """One video of 8 frames of a single merged token (time positions 0..7 beside spatial 0), for
    Qwen2.5-VL spaced by tokens_per_second x 2 s, with or without text after it."""
    inputs = qwen_media_inputs([([5, 6], after)], [[("video", [8, 2, 2])]])
    if kind == "qwen2_5_vl":
        inputs["second_per_grid_ts"] = torch.tensor([2.0])
    return inputs


def traced_generate(model, inputs, steps=4):
    """Tokens, every step's logits and, per decoder layer, the rotary (cos) of the first decode step."""
    seen = {}

    def record(module, args, kwargs):
        if args[0].shape[1] == 1 and module not in seen:
            seen[module] = kwargs["position_embeddings"][0].clone()

    layers = model.model.language_model.layers
    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    try:
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, suppress_tokens=SUPPRESS,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    finally:
        for handle in handles:
            handle.remove()
    return out.sequences, torch.stack(out.logits), [seen[layer] for layer in layers]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("after", [[], [8, 9, 10]], ids=["video_last", "text_after"])
@pytest.mark.parametrize("reducers", [(tokred.FastV(keep=8, layer=1),), (tokred.DivPrune(keep=1.0),),
                                      (tokred.DART(keep=1.0, layer=1),)], ids=str)
@torch.no_grad()
def test_keeping_everything_decodes_a_long_video_as_unpatched(models, kind, after, reducers):
    """Time positions beyond the spatial ones: decode steps take the unpatched model's positions."""
    model = models[kind]
    inputs = long_video_inputs(kind, after)
    positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              video_grid_thw=inputs["video_grid_thw"],
                                              attention_mask=inputs["attention_mask"],
                                              **({"second_per_grid_ts": inputs["second_per_grid_ts"]}
                                                 if kind == "qwen2_5_vl" else {}))
    assert positions[0, 0].max() > positions[1:, 0].max() + 1  # the case: time runs past the text after it
    tokens, logits, rotary = traced_generate(model, inputs)
    with tokred.applied(model, *reducers):
        got_tokens, got_logits, got_rotary = traced_generate(model, inputs)
    assert torch.equal(got_tokens, tokens)
    torch.testing.assert_close(got_logits, logits, rtol=0, atol=1e-5)
    for got, want in zip(got_rotary, rotary):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
