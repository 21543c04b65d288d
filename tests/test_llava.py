"""The LLaVA-family adapter on tiny LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision models built in code
(``onevision_video``: OneVision with a video per sample, 3 frames of 16 tokens and the newline)."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tokred
from helpers import IMAGE_TOKEN, VIDEO_TOKEN, llava_inputs, onevision_video_inputs, tiny_llava, tiny_onevision

KINDS = ["llava", "llava_next", "llava_onevision", "onevision_video"]
PROMPTS = [([1, 2, 3], [4, 5, 6, 7, 8]), ([9], [10, 11])]  # different lengths: the second is left-padded
SUPPRESS = [IMAGE_TOKEN, VIDEO_TOKEN]  # generated placeholders would be taken for images or videos


def make_inputs(kind, model, prompts, seed=0):
    """Left-padded inputs of ``kind``'s model: one image per sample, or one 3-frame video."""
    if kind == "onevision_video":
        return onevision_video_inputs(prompts, frames=3, seed=seed)
    return llava_inputs(model, prompts, seed=seed)


def pixels_of(inputs) -> str:
    return "pixel_values_videos" if "pixel_values_videos" in inputs else "pixel_values"


def reducer_sets(kind):
    """Every reducer, and a composition, at the stages ``kind`` has."""
    sets = {
        "divprune": (tokred.DivPrune(keep=0.25),),
        "divprune_keep_positions": (tokred.DivPrune(keep=5, positions="keep"),),
        "random": (tokred.Random(keep=0.5, stage="projector"),),
        "dart": (tokred.DART(keep=0.5, layer=2, image_pivots=2, text_pivots=2),),
        "dart_renumber": (tokred.DART(keep=0.3, layer=1, positions="renumber"),),
        "fastv": (tokred.FastV(keep=0.25, layer=2),),
        "composed": (tokred.DivPrune(keep=0.5), tokred.FastV(keep=0.5, layer=1, positions="renumber")),
    }
    if kind == "llava":
        sets["pool"] = (tokred.Pool(stride=2, stage="projector"),)
        sets["tome"] = (tokred.ToMe(r=3),)
        sets["tome_divprune_dart"] = (tokred.ToMe(r=2), tokred.DivPrune(keep=0.5), tokred.DART(keep=0.5, layer=2))
    if kind == "onevision_video":
        sets["pool"] = (tokred.Pool(stride=2, stage="projector", temporal_stride=2),)
        sets["random_per_frame"] = (tokred.Random(keep=0.25, stage="projector", per_frame=True),)
        sets["uniform"] = (tokred.Uniform(keep=5),)
        sets["visionzip"] = (tokred.VisionZip(dominant=4, contextual=2),)
        sets["dycoke"] = (tokred.DyCoke(keep=0.3),)
        sets["dycoke_fastv"] = (tokred.DyCoke(keep=0.5, window=2), tokred.FastV(keep=0.5, layer=2))
    return sets


CASES = [(kind, name) for kind in KINDS for name in reducer_sets(kind)]


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_onevision() if kind == "onevision_video" else tiny_llava(kind) for kind in KINDS}


def greedy_uncached(model, inputs, steps):
    """Greedy decoding by re-running the model on the whole sequence at every step (no cache)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    prompt_length = ids.shape[1]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, prompt_length=prompt_length,
                       **extra).logits[:, -1]
        logits[:, SUPPRESS] = -torch.inf
        ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids[:, prompt_length:]


def greedy_cached(model, inputs, steps):
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, suppress_tokens=SUPPRESS,
                         pad_token_id=0)
    return out[:, inputs["input_ids"].shape[1]:]


# identity ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reducers", [(), (tokred.DivPrune(keep=1.0),), (tokred.Random(keep=1.0, stage="projector"),),
                                      (tokred.DART(keep=1.0),), (tokred.FastV(keep=1.0),),
                                      (tokred.AdjacentMerge(keep=1.0),), (tokred.Uniform(keep=1.0),),
                                      (tokred.DyCoke(keep=1.0),),
                                      (tokred.Random(keep=1.0, stage="projector", per_frame=True),)], ids=str)
@torch.no_grad()
def test_removing_nothing_is_the_unpatched_model(models, kind, reducers):
    model = models[kind]
    inputs = make_inputs(kind, model, PROMPTS)
    reference = model(**inputs).logits
    reference_tokens = greedy_cached(model, inputs, 4)
    with tokred.applied(model, *reducers):
        assert torch.equal(model(**inputs).logits, reference)
        assert torch.equal(greedy_cached(model, inputs, 4), reference_tokens)
    assert "forward" not in model.__dict__


# generation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,name", CASES)
@torch.no_grad()
def test_cached_generation_equals_uncached(models, kind, name):
    model = models[kind]
    inputs = make_inputs(kind, model, PROMPTS)
    with tokred.applied(model, *reducer_sets(kind)[name]):
        cached = greedy_cached(model, inputs, 5)
        assert torch.equal(cached, greedy_uncached(model, inputs, 5))
        # the last forward ran on the prompt and 4 generated tokens, and the last layers on fewer
        assert tokred.last_trace(model).tokens("llm")[-1] < inputs["input_ids"].shape[1] + 4


@pytest.mark.parametrize("kind,name", [c for c in CASES if c[1] in ("divprune", "dart", "fastv", "composed",
                                                                     "tome_divprune_dart")]
                         + [("onevision_video", name) for name in ("visionzip", "dycoke_fastv",
                                                                   "pool", "uniform")])
@torch.no_grad()
def test_batch_equals_one_by_one(models, kind, name):
    model = models[kind]
    batch = make_inputs(kind, model, PROMPTS, seed=3)
    singles = [make_inputs(kind, model, [prompt], seed=3) for prompt in PROMPTS]
    pixels = pixels_of(batch)
    with tokred.applied(model, *reducer_sets(kind)[name]):
        logits = model(**batch).logits[:, -1]
        tokens = greedy_cached(model, batch, 4)
        for i, single in enumerate(singles):
            single[pixels] = batch[pixels][i:i + 1]
            torch.testing.assert_close(model(**single).logits[:, -1], logits[i:i + 1], atol=1e-5, rtol=1e-5)
            assert torch.equal(greedy_cached(model, single, 4), tokens[i:i + 1])


# positions -----------------------------------------------------------------------------------------

def layer_positions(model, inputs, steps=1):
    """Position ids each decoder layer saw in the prefill and in ``steps`` decode steps."""
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault(module.self_attn.layer_idx, []).append(kwargs["position_ids"].clone())

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True)
               for layer in model.model.language_model.layers]
    try:
        greedy_cached(model, inputs, steps + 1)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("positions", ["keep", "renumber"])
@torch.no_grad()
def test_projector_positions(models, positions):
    model = models["llava"]
    inputs = llava_inputs(model, [([1, 2, 3], [4, 5])])  # 3 + 16 + 2 tokens
    with tokred.applied(model, tokred.DivPrune(keep=4, positions=positions)):
        seen = layer_positions(model, inputs)
    prefill, decode = seen[0][0][0].tolist(), seen[0][1][0].tolist()
    assert len(prefill) == 3 + 4 + 2
    if positions == "renumber":
        assert prefill == list(range(9)) and decode == [9]
    else:
        assert prefill[:3] == [0, 1, 2] and prefill[-2:] == [19, 20] and decode == [21]
        assert all(a < b for a, b in zip(prefill, prefill[1:])) and all(3 <= p < 19 for p in prefill[3:7])
    assert all(torch.equal(seen[i][0], seen[0][0]) for i in seen)


@pytest.mark.parametrize("positions", ["keep", "renumber"])
@torch.no_grad()
def test_llm_positions(models, positions):
    model = models["llava"]
    inputs = llava_inputs(model, [([1, 2, 3], [4, 5])])
    with tokred.applied(model, tokred.FastV(keep=4, layer=2, positions=positions)):
        seen = layer_positions(model, inputs)
    for layer in (0, 1):  # before K: the whole prompt at its original positions
        assert seen[layer][0][0].tolist() == list(range(21)) and seen[layer][1][0].tolist() == [21]
    after, decode = seen[2][0][0].tolist(), seen[2][1][0].tolist()
    assert len(after) == 9 and seen[3][0][0].tolist() == after
    if positions == "renumber":
        assert after == list(range(9)) and decode == [9]
    else:
        assert after[:3] == [0, 1, 2] and after[-2:] == [19, 20] and decode == [21]


# signals -------------------------------------------------------------------------------------------

class RecordingFastV(tokred.FastV):
    def keep_mask(self, signal):
        RecordingFastV.seen = signal
        return super().keep_mask(signal)


@torch.no_grad()
def test_fastv_attention_row_equals_the_eager_attention():
    eager = tiny_llava("llava", attn="eager")
    inputs = llava_inputs(eager, [([1, 2, 3], [4, 5, 6])])
    layer = 2
    attentions = eager(**inputs, output_attentions=True).attentions
    expected = attentions[layer - 1][:, :, -1].mean(dim=1)  # last token's row, averaged over heads
    with tokred.applied(eager, RecordingFastV(keep=4, layer=layer)):
        eager(**inputs)
        assert tokred.last_trace(eager).tokens("llm")[layer] == inputs["input_ids"].shape[1] - 16 + 4
    torch.testing.assert_close(RecordingFastV.seen.last_attention, expected, atol=1e-6, rtol=1e-5)
    visual = (inputs["input_ids"] == IMAGE_TOKEN)[0]
    expected_keep = expected[0].masked_fill(~visual, -1).topk(4).indices.sort().values
    assert torch.equal(tokred.reducers.fastv.select(RecordingFastV.seen.last_attention[0], visual, 4), expected_keep)


# labels, FLOPs, trace ------------------------------------------------------------------------------

@torch.no_grad()
def test_labels_follow_the_pruning(models):
    model = models["llava"]
    inputs = llava_inputs(model, [([1, 2, 3], [4, 5, 6])])
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN, -100)
    with tokred.applied(model, tokred.DivPrune(keep=4), tokred.DART(keep=2, layer=2)):
        out = model(**inputs, labels=labels)
    expected = torch.tensor([[1, 2, 3] + [-100] * 2 + [4, 5, 6]])
    assert out.logits.shape[1] == 8
    reference = model.loss_function(logits=out.logits, labels=expected, vocab_size=model.config.text_config.vocab_size)
    torch.testing.assert_close(out.loss, reference)


def counted(fn):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("kind,name", [c for c in CASES if c[1] in ("divprune", "dart", "fastv", "composed",
                                                                     "pool", "tome_divprune_dart", "dycoke")]
                         + [(kind, "none") for kind in KINDS])
def test_flops_match_the_flop_counter(models, kind, name):
    model = models[kind]
    inputs = make_inputs(kind, model, PROMPTS)
    with tokred.applied(model, *reducer_sets(kind).get(name, ())):
        prefill = counted(lambda: model(**inputs, use_cache=True))
        report = tokred.flops(model)
        cache = model(**inputs, use_cache=True).past_key_values
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(inputs["attention_mask"][:, :1])], dim=1)
        decode = counted(lambda: model(input_ids=torch.tensor([[5], [6]]), attention_mask=mask, past_key_values=cache,
                                       use_cache=True, logits_to_keep=1))
    assert report.total == prefill
    assert report.decode_per_token == decode
    assert {"vision", "projector", "llm_prefill"} <= set(report.stages)


@torch.no_grad()
def test_reductions_compose_and_show_in_the_trace(models):
    model = models["llava"]
    inputs = llava_inputs(model, PROMPTS)
    with tokred.applied(model, tokred.ToMe(r=2), tokred.DivPrune(keep=0.5), tokred.DART(keep=0.5, layer=2)):
        model(**inputs)
        trace = tokred.last_trace(model)
        full = tokred.flops(model).total
    vision = trace.tokens("vision")
    assert vision[0] == 17 - 2 and vision[-1] == 17 - 6  # ToMe in the tower (class token + 16 patches)
    projector = [r for r in trace.layers if r.stage == "projector"][0]
    # the tower's layer -2 output: 13 tokens, 12 without the class token; DivPrune keeps 6 of them
    assert (projector.tokens_in, projector.tokens_out) == (2 * 16, 2 * 6)
    llm = trace.tokens("llm")  # each sample loses 10 visual tokens, then DART removes 3 more
    assert llm[0] == llm[1] == inputs["input_ids"].shape[1] - 10 and llm[2] == llm[3] == llm[0] - 3
    assert tokred.flops(model, **inputs).total > full  # unpatched: everything runs


# bad input -----------------------------------------------------------------------------------------

def assert_untouched(model, inputs, reference):
    assert tokred.reducers_of(model) == () and "forward" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)


@pytest.mark.parametrize("kind,reducers,message", [
    ("llava", (tokred.DivPrune(keep=17),), "only 16"),
    ("llava", (tokred.DART(keep=0.5, layer=4),), "layer"),
    ("llava", (tokred.FastV(keep=0.5, layer=7),), "layer"),
    ("llava_next", (tokred.ToMe(r=2),), "projector"),
    ("llava_onevision", (tokred.Random(keep=0.5),), "projector"),
    ("llava_next", (tokred.Pool(stride=2, stage="projector"),), "grid"),
    ("llava", (tokred.DivPrune(keep=0.5), tokred.Random(keep=0.5, stage="projector")), "one reducer per stage"),
])
def test_bad_reductions_leave_the_model_untouched(models, kind, reducers, message):
    model = models[kind]
    inputs = llava_inputs(model, PROMPTS)
    with torch.no_grad():
        reference = model(**inputs).logits
    with pytest.raises(ValueError, match=message):
        tokred.apply(model, *reducers)
    assert_untouched(model, inputs, reference)


@pytest.mark.parametrize("bad", [dict(keep=0), dict(keep=1.5), dict(keep=-2), dict(keep=True), dict(keep="all"),
                                 dict(keep=0.5, positions="gaps")])
def test_bad_divprune_arguments(bad):
    with pytest.raises(ValueError):
        tokred.DivPrune(**bad)


@torch.no_grad()
def test_placeholders_that_do_not_match_the_images(models):
    model = tokred.apply(models["llava"], tokred.DivPrune(keep=0.5))
    try:
        inputs = llava_inputs(model, PROMPTS)
        short = dict(inputs, input_ids=inputs["input_ids"].clone())
        short["input_ids"][0, 5] = 7  # one placeholder fewer
        with pytest.raises(ValueError, match="placeholder"):
            model(**short)
        split = dict(inputs, pixel_values=inputs["pixel_values"][:1])  # two images' placeholders, one image
        with pytest.raises(ValueError, match="placeholder"):
            model(**split)
        with pytest.raises(ValueError, match="keep=9 tokens, but there are only 8"):
            tokred.apply(model, tokred.DivPrune(keep=0.5), tokred.DART(keep=9, layer=2))
            model(**inputs)
    finally:
        tokred.remove(model)


def test_unsupported_vlm_class_names_the_families():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(TypeError, match="LLaVA family"):
        tokred.apply(model, tokred.DivPrune(keep=0.5))
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("reducer", [tokred.DivPrune(keep=0.5), tokred.DART(keep=0.5),
                                     tokred.Random(keep=0.5, stage="projector")], ids=str)
def test_language_model_stages_on_a_vision_model(reducer):
    from helpers import tiny_vit

    model = tiny_vit()
    with pytest.raises(ValueError, match=f"'{reducer.stage}' stage, which VisionTransformer does not have"):
        tokred.apply(model, reducer)
    assert type(model).__name__ == "VisionTransformer"


@torch.no_grad()
def test_applying_again_replaces_the_reducers(models):
    model = models["llava"]
    inputs = llava_inputs(model, PROMPTS)
    unpatched = model(**inputs).logits
    with tokred.applied(model, tokred.FastV(keep=3, layer=1)):
        expected = model(**inputs).logits
    with tokred.applied(model, tokred.DivPrune(keep=0.5)):
        tokred.apply(model, tokred.FastV(keep=3, layer=1))
        assert torch.equal(model(**inputs).logits, expected)
        assert tokred.reducers_of(model) == (tokred.FastV(keep=3, layer=1),)
        tokred.apply(model, tokred.FastV(keep=1.0))  # removes nothing: the model's own forward
        assert torch.equal(model(**inputs).logits, unpatched)
    assert "forward" not in model.__dict__ and "_tokred_adapter" not in model.__dict__


@torch.no_grad()
def test_refused_options_while_removing_tokens(models):
    model = models["llava"]
    inputs = llava_inputs(model, PROMPTS)
    with tokred.applied(model):  # nothing removed: everything the model offers still works
        assert len(model(**inputs, output_hidden_states=True).hidden_states) == 5
    with tokred.applied(model, tokred.DivPrune(keep=0.5)):
        for flag in ("output_attentions", "output_hidden_states"):
            with pytest.raises(ValueError, match=flag):
                model(**inputs, **{flag: True})
        cache = model(**inputs, use_cache=True).past_key_values
        del cache._tokred  # a cache tokred did not fill
        with pytest.raises(ValueError, match="empty cache"):
            model(**inputs, past_key_values=cache)
