"""generate() as transformers offers it, with every language-model reducer, on LLaVA and Qwen2-VL:
without a cache, and with assisted (prompt lookup) decoding, it gives the cached greedy tokens."""
import pytest
import torch

import tokred
from helpers import (IMAGE_TOKEN, QWEN_END, QWEN_IMAGE, QWEN_START, QWEN_VIDEO, clustered, llava_inputs, qwen_inputs,
                     tiny_llava, tiny_qwen2_vl)
from tokred.reducers.budget import Budget

FAMILIES = ["llava", "qwen2_vl"]
PROMPTS = [([1, 2, 3], [4, 5, 6, 7, 8]), ([9], [10, 11])]  # different lengths: the second is left-padded
SUPPRESS = {"llava": [IMAGE_TOKEN], "qwen2_vl": [2, QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END]}


def llm_reducers():
    """Every reducer that decides inside the language model on the prompt, one with a Budget keep."""
    budget = Budget.fit("distortion", clustered(8, dim=64), mean_keep=0.3, eps=0.1, max_keep=0.6)
    return {"fastv": tokred.FastV(keep=0.25, layer=2),
            "dart": tokred.DART(keep=0.25, layer=2, image_pivots=1, text_pivots=6),
            "holitom_inner": tokred.HoliTomInner(keep=0.3, layer=2),
            "atp": tokred.ATP(layers=(1, 2, 3), thresholds=(0.9, 1.0, 1.1), strides=(4, 4, 2)),
            "adjacent": tokred.AdjacentMerge(keep=0.5, layer=2), "fastv_budget": tokred.FastV(keep=budget, layer=2)}


@pytest.fixture(scope="module")
def models():
    return {"llava": tiny_llava("llava"), "qwen2_vl": tiny_qwen2_vl()}


def make_inputs(family, model):
    if family == "llava":
        return llava_inputs(model, PROMPTS)
    return qwen_inputs(PROMPTS, [[1, 8, 6], [1, 4, 4]])


def generated(model, family, inputs, **settings):
    """Greedy tokens after the prompt and the logits of each step."""
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, suppress_tokens=SUPPRESS[family],
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True, **settings)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(llm_reducers()))
@torch.no_grad()
def test_uncached_generate_equals_cached_generate(models, family, name):
    """Each uncached step re-runs prompt + generated tokens; the reducer still decides on the prompt."""
    model = models[family]
    inputs = make_inputs(family, model)
    with tokred.applied(model, llm_reducers()[name]):
        tokens, logits = generated(model, family, inputs)
        uncached_tokens, uncached_logits = generated(model, family, inputs, use_cache=False)
        assert torch.equal(uncached_tokens, tokens)
        torch.testing.assert_close(uncached_logits, logits, atol=1e-5, rtol=1e-5)
        llm = tokred.last_trace(model).tokens("llm")
        assert llm[-1] < llm[0] == inputs["input_ids"].shape[1] + 4  # the last step re-ran prompt + 4 tokens, reduced
    assert "generate" not in model.__dict__ and "forward" not in model.__dict__


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["divprune", "fastv", "dart", "holitom_inner", "atp"])
@torch.no_grad()
def test_prompt_lookup_decoding_equals_greedy_generate(models, family, name):
    """Assisted decoding runs the prompt with its first drafts in the prefill and crops the cache after
    rejected drafts; the reducers decide on the prompt alone and the bookkeeping follows the crops."""
    model = models[family]
    prompt = [([1, 2, 3], [4, 5, 6, 7, 4, 5, 6, 7, 4, 5])]  # repeated n-grams: the lookup drafts tokens
    inputs = llava_inputs(model, prompt) if family == "llava" else qwen_inputs(prompt, [[1, 8, 6]])
    reducer = tokred.DivPrune(keep=0.25) if name == "divprune" else llm_reducers()[name]
    with tokred.applied(model, reducer):
        tokens, logits = generated(model, family, inputs)
        assisted_tokens, assisted_logits = generated(model, family, inputs, prompt_lookup_num_tokens=3)
    assert torch.equal(assisted_tokens, tokens)
    torch.testing.assert_close(assisted_logits, logits, atol=1e-5, rtol=1e-5)
