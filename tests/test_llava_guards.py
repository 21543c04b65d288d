"""LLaVA adapter: compatibility guards (transformers renames), bad numbers and the faults a
bad-input probe found — each test fails if its fix is taken out."""
import copy

import pytest
import torch
import transformers

import tokred
from helpers import IMAGE_TOKEN, llava_inputs, next_step, stripped, tiny_llava
from tokred.decoder import CompatibilityError
from tokred.reducers import dart, divprune, fastv
from tokred.signals import SequenceSignal

KINDS = ["llava", "llava_next", "llava_onevision"]
PROMPTS = [([1, 2, 3], [4, 5, 6, 7, 8]), ([9], [10, 11])]


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_llava(kind) for kind in KINDS}


# the cache keyword and the guard --------------------------------------------------------------------

@torch.no_grad()
def test_cache_under_either_name_gives_the_same_decode_step(models):
    model = models["llava"]
    inputs = llava_inputs(model, PROMPTS)
    steps = []
    with tokred.applied(model, tokred.DART(keep=0.5, layer=2)):
        for name in ("cache", "past_key_values"):
            out = model(**inputs, use_cache=True)
            token, mask = next_step(inputs, out)
            steps.append(model(input_ids=token, attention_mask=mask, **{name: out.cache}).logits)
    assert torch.equal(steps[0], steps[1])


@pytest.mark.parametrize("reducer", [tokred.DART(keep=0.5, layer=2), tokred.DivPrune(keep=0.25)], ids=str)
@torch.no_grad()
def test_decode_on_a_reduced_cache_without_bookkeeping_is_refused(models, reducer):
    model = models["llava"]
    inputs = llava_inputs(model, PROMPTS)
    with tokred.applied(model, reducer):
        out = model(**inputs, use_cache=True)
        token, mask = next_step(inputs, out)
        with pytest.raises(CompatibilityError, match=f"bookkeeping.*transformers {transformers.__version__}"):
            model(input_ids=token, attention_mask=mask, cache=stripped(out.cache))
        model(input_ids=token, attention_mask=mask, cache=out.cache)  # with its bookkeeping it decodes


@torch.no_grad()
def test_decode_after_an_unreduced_prefill_passes_the_guard(models):
    model = models["llava"]
    inputs = llava_inputs(model, PROMPTS)
    out = model(**inputs, use_cache=True)
    token, mask = next_step(inputs, out)
    expected = model(input_ids=token, attention_mask=mask, cache=stripped(out.cache)).logits
    with tokred.applied(model):
        out = model(**inputs, use_cache=True)
        assert torch.equal(model(input_ids=token, attention_mask=mask, cache=stripped(out.cache)).logits, expected)


@torch.no_grad()
def test_an_unknown_keyword_is_refused_by_name(models):
    """A misspelt or renamed argument (here: the cache arriving as ``kv_cache``) must not be run on as if
    absent; the error names it and the installed transformers, and does not send the user to reinstall."""
    model = models["llava"]
    inputs = llava_inputs(model, PROMPTS)
    with tokred.applied(model, tokred.DART(keep=0.5, layer=2)):
        out = model(**inputs, use_cache=True)
        token, mask = next_step(inputs, out)
        with pytest.raises(TypeError, match=r"keyword argument\(s\) 'kv_cache'.*transformers "
                           + transformers.__version__) as error:
            model(input_ids=token, attention_mask=mask, kv_cache=out.cache)
        assert "install" not in str(error.value)


@pytest.mark.parametrize("reducer", [tokred.FastV(keep=0.5, layer=2), tokred.DART(keep=0.5, layer=2),
                                     tokred.ATP(layers=(1, 3), thresholds=1.0)], ids=str)
def test_gradient_checkpointing_is_refused_for_reducers_reading_the_cache(models, reducer):
    """Checkpointed decoder layers run without a cache, where FastV / DART / ATP read their keys: a clear
    refusal while training with gradients; in eval mode or without gradients the same model runs."""
    model = models["llava"]
    inputs = llava_inputs(model, PROMPTS)
    model.gradient_checkpointing_enable()
    try:
        with tokred.applied(model, reducer):
            model.train()
            with pytest.raises(ValueError, match="gradient checkpointing.*gradient_checkpointing_disable"):
                model(**inputs)
            with torch.no_grad():
                model(**inputs)
            model.eval()
            model(**inputs)
    finally:
        model.gradient_checkpointing_disable()
        model.eval()


def test_a_decoder_layer_with_another_signature_is_refused(models):
    model = models["llava"]
    layer = model.model.language_model.layers[1]
    original = type(layer)

    class RenamedLayer(original):
        def forward(self, hidden_states, attention_mask=None, position_ids=None, kv_cache=None, use_cache=False,
                    position_embeddings=None, **kwargs):
            return super().forward(hidden_states, attention_mask, position_ids, kv_cache, use_cache,
                                   position_embeddings, **kwargs)

    layer.__class__ = RenamedLayer
    try:
        with pytest.raises(CompatibilityError, match="RenamedLayer.*transformers " + transformers.__version__):
            tokred.apply(model, tokred.DART(keep=0.5))
        assert "forward" not in model.__dict__ and "_tokred_adapter" not in model.__dict__
    finally:
        layer.__class__ = original


# the final norm matters (non-trivial norm weights in the tiny models) --------------------------------

class RecordingDART(tokred.DART):
    def keep_mask(self, signal):
        RecordingDART.seen = signal
        return super().keep_mask(signal)


@torch.no_grad()
def test_dart_decides_on_final_normed_hidden_states_and_layer_k_minus_1_keys(models):
    model = models["llava"]
    inputs = llava_inputs(model, [([1, 2, 3], [4, 5, 6])])
    layer = 2
    reference = model(**inputs, use_cache=True, output_hidden_states=True)
    hidden = model.model.language_model.norm(reference.hidden_states[layer])[0]
    norms = dart.key_norms(reference.cache.layers[layer - 1].keys)[0]
    visual = (inputs["input_ids"] == IMAGE_TOKEN)[0]
    text = torch.zeros_like(visual)
    text[int(visual.nonzero().max()) + 1:] = True
    differs = False
    for k in range(2, 15):
        with tokred.applied(model, RecordingDART(keep=k, layer=layer, image_pivots=1, text_pivots=2)):
            model(**inputs)
        seen = RecordingDART.seen
        torch.testing.assert_close(seen.hidden[0], hidden)
        torch.testing.assert_close(dart.key_norms(seen.keys)[0], norms)
        expected = dart.select(hidden, norms, visual, text, k, 1, 2)
        assert torch.equal(dart.select(seen.hidden[0], dart.key_norms(seen.keys)[0], visual, text, k, 1, 2), expected)
        unnormed = dart.select(reference.hidden_states[layer][0], norms, visual, text, k, 1, 2)
        differs = differs or not torch.equal(unnormed, expected)
    assert differs, "the final norm's weights should change DART's choice for some k (else this test cannot fail)"


# non-finite signals ---------------------------------------------------------------------------------

def test_non_finite_signals_are_refused():
    hidden, norm = torch.randn(12, 8), torch.rand(12)
    visual = torch.zeros(12, dtype=torch.bool)
    visual[2:10] = True
    text = ~visual
    text[:2] = False
    bad = hidden.clone()
    bad[4, 0] = float("nan")
    with pytest.raises(ValueError, match="DART: 1 non-finite"):
        dart.select(bad, norm, visual, text, 4)
    with pytest.raises(ValueError, match="DART: 1 non-finite.*key norms"):
        dart.select(hidden, norm.index_fill(0, torch.tensor([3]), float("inf")), visual, text, 4)
    with pytest.raises(ValueError, match="FastV: 1 non-finite"):
        fastv.select(norm.index_fill(0, torch.tensor([5]), float("nan")), visual, 4)
    with pytest.raises(ValueError, match="DivPrune: 1 non-finite"):
        divprune.select(bad[None], 4)
    # padding and text outside the candidates may hold anything
    dart.select(hidden, norm.index_fill(0, torch.tensor([0]), float("nan")), visual, text, 4)


def test_dart_keep_mask_refuses_nan_hidden_states():
    """The probe's case: NaN sorts after the +inf marking picked tokens, so they were picked again."""
    length = 60
    visual = torch.zeros(1, length, dtype=torch.bool)
    visual[0, 5:50] = True
    everything = torch.ones(1, length, dtype=torch.bool)
    hidden = torch.randn(1, length, 16)
    hidden[0, 10:20] = float("nan")
    signal = SequenceSignal(hidden=hidden, visual=visual, valid=everything, prompt=everything,
                            keys=torch.randn(1, 2, length, 4))
    with pytest.raises(ValueError, match="DART: .*non-finite"):
        tokred.DART(keep=43).keep_mask(signal)


@torch.no_grad()
def test_nan_image_features_are_refused_and_the_model_still_works(models):
    model = models["llava"]
    inputs = llava_inputs(model, PROMPTS)
    bad = dict(inputs, pixel_values=inputs["pixel_values"].clone().fill_(float("nan")))
    with tokred.applied(model, tokred.DivPrune(keep=0.25)):
        with pytest.raises(ValueError, match="DivPrune: .*non-finite"):
            model(**bad)
        assert torch.isfinite(model(**inputs).logits).all()


# the probe's faults ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reducer_class", [tokred.FastV, tokred.DART])
@torch.no_grad()
def test_int_keep_one_is_one_token(models, kind, reducer_class):
    model = models[kind]
    inputs = llava_inputs(model, [([1, 2, 3], [4, 5])])
    visual = int((inputs["input_ids"] == IMAGE_TOKEN).sum())
    with tokred.applied(model, reducer_class(keep=1, layer=2)):
        model(**inputs)
        tokens = tokred.last_trace(model).tokens("llm")
    assert tokens[2] == inputs["input_ids"].shape[1] - visual + 1


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_deepcopy_of_a_patched_model_runs_the_copy(models, kind):
    model = models[kind]
    inputs = llava_inputs(model, PROMPTS)
    with tokred.applied(model, tokred.DivPrune(keep=0.5), tokred.FastV(keep=0.5, layer=1)):
        expected = model(**inputs).logits
        clone = copy.deepcopy(model)
        clone.lm_head.weight.data.zero_()
        assert torch.equal(clone(**inputs).logits, torch.zeros_like(expected))
        assert tokred.last_trace(clone).tokens("llm")[1] < inputs["input_ids"].shape[1]
        assert torch.equal(model(**inputs).logits, expected)
        assert tokred.reducers_of(clone) == tokred.reducers_of(model)
    tokred.remove(clone)
    assert "forward" not in clone.__dict__


@torch.no_grad()
def test_new_images_on_a_reduced_cache_are_refused(models):
    model = models["llava"]
    inputs = llava_inputs(model, PROMPTS)
    with tokred.applied(model, tokred.DART(keep=0.5, layer=2)):
        out = model(**inputs, use_cache=True)
        with pytest.raises(ValueError, match="reduced prefill; tokred cannot add new images"):
            model(**inputs, cache=out.cache)


@torch.no_grad()
def test_beam_search_with_projector_pruning(models):
    """generate() expands the prompt per beam; the cache is reordered per beam with its bookkeeping."""
    model = models["llava"]
    inputs = llava_inputs(model, PROMPTS)
    settings = dict(max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2,
                    suppress_tokens=[IMAGE_TOKEN], pad_token_id=0)
    with tokred.applied(model, tokred.DivPrune(keep=0.25)):
        cached = model.generate(**inputs, **settings)
        assert torch.equal(cached, model.generate(**inputs, use_cache=False, **settings))
        assert tokred.last_trace(model).tokens("llm")[0] < inputs["input_ids"].shape[1]


@torch.no_grad()
def test_beam_search_with_a_vision_stage_reducer_is_refused(models):
    model = models["llava"]
    inputs = llava_inputs(model, PROMPTS)
    with tokred.applied(model, tokred.ToMe(r=2)):
        with pytest.raises(ValueError, match="num_beams=1, or reduce at the projector stage"):
            model.generate(**inputs, max_new_tokens=2, num_beams=2, do_sample=False, pad_token_id=0)


@torch.no_grad()
def test_thresholds_in_the_tower_batch_equals_one_by_one():
    """Images that keep different numbers of tower tokens: padding rows must not reach the language model."""
    model = tiny_llava("llava").double()
    prompts = [([1, 2, 3], [4, 5]), ([7], [8, 9, 10, 11, 12])]
    batch = llava_inputs(model, prompts, seed=5)
    batch["pixel_values"] = batch["pixel_values"].double()
    batch["pixel_values"][1] = 0.3  # a flat image merges far more than a noisy one
    with tokred.applied(model, tokred.Thresholds(merge=0.5, prune=0.9)):
        logits = model(**batch).logits[:, -1]
        counts = tokred.last_trace(model).layers[len(model.model.vision_tower.encoder.layers)
                                                 - 2].tokens_per_image
        assert counts is not None and counts[0] != counts[1]
        for i, prompt in enumerate(prompts):
            single = llava_inputs(model, [prompt], seed=5)
            single["pixel_values"] = batch["pixel_values"][i:i + 1]
            torch.testing.assert_close(model(**single).logits[:, -1], logits[i:i + 1], atol=1e-10, rtol=1e-10)


def test_patching_only_a_llavas_vision_tower_explains_itself():
    """The tower alone is a CLIP vision tower (vision stage only): an llm reducer there says to apply it to
    the whole model; a tower patched on its own and the LLaVA patched as a whole refuse each other by name."""
    model = tiny_llava()
    tower = model.model.vision_tower
    classes = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="'llm' stage.*apply the reducer to the whole model"):
        tokred.apply(tower, tokred.FastV(keep=0.5, layer=2))
    assert [type(m) for m in model.modules()] == classes
    tokred.apply(tower, tokred.ToMe(r=2))
    with torch.no_grad():
        tower(pixel_values=torch.randn(1, 3, 32, 32))
    assert tokred.last_trace(tower).tokens()[-1] < tokred.last_trace(tower).layers[0].tokens_in
    with pytest.raises(ValueError, match=r"vision tower of this model \(CLIPVisionModel\) is already patched by "
                                         r"tokred on its own.*tokred.remove\(tower\)"):
        tokred.apply(model, tokred.ToMe(r=2))
    tokred.remove(tower)
    tokred.apply(model, tokred.ToMe(r=2))
    with pytest.raises(ValueError, match="already patched by tokred as part of LlavaForConditionalGeneration"):
        tokred.apply(tower, tokred.ToMe(r=3))
    tokred.remove(model)
    assert [type(m) for m in model.modules()] == classes
