"""AdjacentMerge: tokred's llm-stage merge (neighbouring similar visual tokens), its rule and the
engine's handling of merged tokens (sizes, log-size bias, cached == uncached, batch == one by one)."""
import pytest
import torch

import tokred
from helpers import IMAGE_TOKEN, llava_inputs, tiny_llava
from test_llava import PROMPTS, greedy_cached, greedy_uncached
from tokred.reducers.adjacent import AdjacentMerge, select


def brute_force(hidden, visual, k):
    """The rule written out with Python lists."""
    links = [i for i in range(len(visual) - 1) if visual[i] and visual[i + 1]]
    cos = torch.nn.functional.cosine_similarity
    score = {i: cos(hidden[i].double(), hidden[i + 1].double(), dim=0).item() for i in links}
    chosen = set(sorted(links, key=lambda i: (-score[i], i))[:min(int(visual.sum()) - k, len(links))])
    into, start = [], None
    for j in range(len(visual)):
        if j - 1 in chosen:
            into.append(start)
        else:
            start = j
            into.append(-1)
    return into


def test_hand_worked_case():
    # text t0, visual v1..v5, text t6. Directions: v1=v2 (cos 1), v2.v3 = 0, v3.v4 = 0.6, v4.v5 = 0.
    hidden = torch.tensor([[9., 9], [1, 0], [1, 0], [0, 1], [0.6, 0.8], [-0.8, 0.6], [9, 9]])
    visual = torch.tensor([False, True, True, True, True, True, False])
    assert select(hidden, visual, 4).tolist() == [-1, -1, 1, -1, -1, -1, -1]  # v2 -> v1
    assert select(hidden, visual, 3).tolist() == [-1, -1, 1, -1, 3, -1, -1]  # and v4 -> v3
    # k=2: links v2-v3 and v4-v5 tie at 0: the lower position (v2-v3) merges; v1..v4 is one run
    assert select(hidden, visual, 2).tolist() == [-1, -1, 1, 1, 1, -1, -1]
    assert select(hidden, visual, 5).tolist() == [-1] * 7


@pytest.mark.parametrize("k", [1, 3, 7, 12])
def test_select_equals_brute_force(k):
    generator = torch.Generator().manual_seed(k)
    for _ in range(5):
        hidden = torch.randn(20, 6, generator=generator)
        visual = torch.zeros(20, dtype=torch.bool)
        visual[2:9] = True
        visual[11:18] = True  # two visual items: no link across them
        kk = min(k, 14)
        assert select(hidden, visual, kk).tolist() == brute_force(hidden, visual, kk)


@pytest.mark.parametrize("bad", [dict(keep=0), dict(keep=1.5), dict(keep=0.5, layer=0),
                                 dict(keep=0.5, prop_attn="yes"), dict(keep=0.5, positions="gaps")])
def test_bad_arguments(bad):
    with pytest.raises((ValueError, TypeError)):
        AdjacentMerge(**bad)


def test_nan_hidden_states_are_refused():
    hidden = torch.randn(5, 3)
    hidden[2, 1] = float("nan")
    with pytest.raises(ValueError, match="AdjacentMerge: 1 non-finite"):
        select(hidden, torch.ones(5, dtype=torch.bool), 2)


@pytest.fixture(scope="module")
def model():
    return tiny_llava("llava")


@pytest.mark.parametrize("reducers", [(AdjacentMerge(keep=0.25, layer=2),),
                                      (AdjacentMerge(keep=5, layer=1, positions="renumber"),),
                                      (tokred.DivPrune(keep=0.5), AdjacentMerge(keep=0.5, layer=2))], ids=str)
@torch.no_grad()
def test_cached_generation_equals_uncached(model, reducers):
    inputs = llava_inputs(model, PROMPTS)
    with tokred.applied(model, *reducers):
        assert torch.equal(greedy_cached(model, inputs, 5), greedy_uncached(model, inputs, 5))


@torch.no_grad()
def test_sizes_sum_to_the_input_tokens_and_batch_equals_one_by_one(model):
    batch = llava_inputs(model, PROMPTS, seed=3)
    with tokred.applied(model, AdjacentMerge(keep=0.25, layer=2)):
        logits = model(**batch).logits[:, -1]
        trace = tokred.last_trace(model)
        sizes = trace.sizes
        lengths = batch["attention_mask"].sum(dim=1)
        assert torch.equal(sizes.sum(dim=1).long(), lengths)
        visual = (batch["input_ids"] == IMAGE_TOKEN).sum(dim=1)
        layer2 = next(r for r in trace.layers if r.stage == "llm" and r.layer == 2)
        assert layer2.tokens_per_image == (lengths - visual + 4).tolist()  # 16 visual -> 4
        assert sizes.max() > 1
        for i, prompt in enumerate(PROMPTS):
            single = llava_inputs(model, [prompt], seed=3)
            single["pixel_values"] = batch["pixel_values"][i:i + 1]
            torch.testing.assert_close(model(**single).logits[:, -1], logits[i:i + 1], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_proportional_attention_reaches_the_later_layers(model):
    inputs = llava_inputs(model, PROMPTS)
    with tokred.applied(model, AdjacentMerge(keep=0.25, layer=2)):
        with_bias = model(**inputs).logits
    with tokred.applied(model, AdjacentMerge(keep=0.25, layer=2, prop_attn=False)):
        without = model(**inputs).logits
    assert with_bias.shape == without.shape and not torch.allclose(with_bias, without)
