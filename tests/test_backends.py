"""Attention backends (``attn_implementation``): the language-model stage runs on eager and SDPA and
refuses the rest at ``apply`` (the model untouched) and at forward time when switched after it;
vision stages run their own attention, so any backend the tower has is fine; eager == SDPA."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AttentionInterface  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

import tokred  # noqa: E402
from helpers import llava_inputs, next_step, qwen_inputs, tiny_llava, tiny_onevision, tiny_qwen2_vl  # noqa: E402

PROMPTS = [([1, 2, 3], [4, 5, 6]), ([7], [8, 9])]
#: a backend like FlashAttention: it takes no mask (and would misread a 4-D float one), registered under a
#: kernel-hub-style name so that CPU can run it
NO_MASK = "tokred-tests/no-mask-attention"
#: names a user meets, none of which take the loop's 4-D additive mask
REFUSED = ["flash_attention_2", "flash_attention_3", "flex_attention", "paged|sdpa", NO_MASK]


CALLS = []  # one entry per call of the no-mask backend


def no_mask_attention(module, query, key, value, attention_mask, **kwargs):
    CALLS.append(query.shape[2])
    if attention_mask is not None:
        raise AssertionError("this backend takes no attention mask")
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def no_mask_backend():
    AttentionInterface.register(NO_MASK, no_mask_attention)
    yield
    AttentionInterface._global_mapping.pop(NO_MASK)


def set_backend(config, name):
    """What ``set_attn_implementation`` does, without its check that the kernel is installed."""
    config._attn_implementation = name


def snapshot(model):
    """Everything ``apply`` could change: every module's class and instance attributes, the weights."""
    return ([(type(m), sorted(m.__dict__)) for m in model.modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


def assert_same(before, after):
    assert before[0] == after[0]
    assert before[1].keys() == after[1].keys() and all(torch.equal(before[1][k], after[1][k]) for k in before[1])


def llava():
    model = tiny_llava("llava")
    return model, llava_inputs(model, PROMPTS)


def qwen():
    return tiny_qwen2_vl("qwen2_vl"), qwen_inputs(PROMPTS, [[1, 8, 6], [1, 4, 4]])


FAMILIES = {"llava": llava, "qwen2_vl": qwen}


@pytest.fixture(scope="module")
def built():
    return {name: make() for name, make in FAMILIES.items()}


# the language-model stage ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", REFUSED)
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_a_language_model_backend_without_the_additive_mask_is_refused_at_apply(built, family, backend):
    model, inputs = built[family]
    want = model(**inputs).logits
    before = snapshot(model)
    set_backend(model.config.text_config, backend)
    try:
        with pytest.raises(ValueError, match=rf"runs '{backend}' in decoder layer\(s\) \[0, 1, 2, 3\].*eager, sdpa"):
            tokred.apply(model, tokred.FastV(keep=4, layer=2))
    finally:
        set_backend(model.config.text_config, "sdpa")
    assert_same(before, snapshot(model))
    assert torch.equal(model(**inputs).logits, want)


def test_apply_without_a_reducer_runs_on_any_backend(built):
    """Without a reducer nothing is removed and every forward is the model's own: nothing to refuse."""
    model, _ = built["llava"]
    before = snapshot(model)
    set_backend(model.config.text_config, "flash_attention_2")
    try:
        with tokred.applied(model):
            assert "forward" in model.__dict__
    finally:
        set_backend(model.config.text_config, "sdpa")
    assert_same(before, snapshot(model))


@torch.no_grad()
def test_a_backend_switched_after_apply_is_refused_at_forward_and_decode(built):
    model, inputs = built["llava"]
    text = model.config.text_config
    with tokred.applied(model, tokred.FastV(keep=4, layer=2)):
        want = model(**inputs, use_cache=True)
        token, mask = next_step(inputs, want)
        step = model(input_ids=token, attention_mask=mask, cache=want.cache).logits
        out = model(**inputs, use_cache=True)
        set_backend(text, "flash_attention_2")
        try:
            with pytest.raises(ValueError, match="switched after tokred.apply to 'flash_attention_2'"):
                model(**inputs)
            with pytest.raises(ValueError, match="switched after tokred.apply to 'flash_attention_2'"):
                model(input_ids=token, attention_mask=mask, cache=out.cache)
        finally:
            set_backend(text, "sdpa")
        assert torch.equal(model(input_ids=token, attention_mask=mask, cache=out.cache).logits, step)
        model.set_attn_implementation("eager")  # switching to a supported backend is fine
        try:
            torch.testing.assert_close(model(**inputs).logits, want.logits, atol=1e-5, rtol=1e-5)
        finally:
            model.set_attn_implementation("sdpa")


REDUCERS = {"llava": [tokred.ToMe(r=2), tokred.FastV(keep=3, layer=2)],
            "qwen2_vl": [tokred.DivPrune(keep=0.5), tokred.DART(keep=0.5, layer=2)]}


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_eager_and_sdpa_give_the_same_reduced_results(built, family):
    model, inputs = built[family]
    results = []
    for backend in ("sdpa", "eager"):
        model.set_attn_implementation(backend)
        with tokred.applied(model, *REDUCERS[family]):
            results.append((model(**inputs).logits, tokred.last_trace(model).tokens("llm"),
                            model.generate(**inputs, max_new_tokens=4, do_sample=False)))
    model.set_attn_implementation("sdpa")
    (sdpa_logits, sdpa_tokens, sdpa_generated), (eager_logits, eager_tokens, eager_generated) = results
    assert sdpa_tokens == eager_tokens and sdpa_tokens[-1] < sdpa_tokens[0]
    torch.testing.assert_close(eager_logits, sdpa_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(eager_generated, sdpa_generated)


# vision stages -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: tiny_llava("llava").model.vision_tower,
                                  lambda: tiny_onevision().model.vision_tower], ids=["clip", "siglip"])
@torch.no_grad()
def test_a_vision_tower_reduces_on_any_backend(make, images):
    """Blocks that reduce or carry the log-size bias run tokred's own SDPA; block 0 (no merge, no bias) the
    tower's own backend, which gets no mask: a backend that takes none gives the SDPA tower's reduced output."""
    tower = make()
    size = tower.config.image_size
    pixels = torch.nn.functional.interpolate(images, size=(size, size))
    with tokred.applied(tower, tokred.ToMe(r=[0, 2])):
        want = tower(pixel_values=pixels).last_hidden_state
        set_backend(tower.config, NO_MASK)
        CALLS.clear()
        got = tower(pixel_values=pixels).last_hidden_state
        assert CALLS == [tokred.last_trace(tower).layers[0].tokens_in]  # block 0, unreduced
        assert got.shape[1] < CALLS[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_a_llava_vision_tower_on_another_backend_than_its_language_model():
    model, inputs = llava()
    reducer = tokred.ToMe(r=[0, 2])
    with tokred.applied(model, reducer):
        want = model(**inputs).logits
        set_backend(model.config.vision_config, NO_MASK)
        CALLS.clear()
        torch.testing.assert_close(model(**inputs).logits, want, atol=1e-6, rtol=1e-5)
        assert CALLS  # the tower's block 0 ran on it
    with tokred.applied(model, reducer):  # applying with it is fine too
        torch.testing.assert_close(model(**inputs).logits, want, atol=1e-6, rtol=1e-5)
