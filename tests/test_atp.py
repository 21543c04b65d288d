"""ATP-style pruning at several decoder layers: the importance and keep rules against brute force,
the attention rows against the eager attention, identities, cached == uncached, batch == one by
one (LLaVA and Qwen2-VL), original positions, the calibration to a FLOPs budget, bad input."""
import math

import pytest
import torch

import tokred
from helpers import IMAGE_TOKEN, llava_inputs, qwen_inputs, tiny_llava, tiny_qwen2_vl
from tokred.reducers.atp import ATP, _quantile_threshold, importance, keep_rule

PROMPTS = [([1, 2, 3], [4, 5, 6, 7, 8]), ([9], [10, 11]), ([5, 6], [])]  # the last: no text after the image
PRUNING = ATP(layers=(1, 2, 3), thresholds=(0.9, 1.0, 1.1), strides=(4, 4, 2))


# the rules -------------------------------------------------------------------------------------------

def brute_importance(attention, visual, valid, text):
    length = len(visual)
    live = [sum(valid[:j + 1]) for j in range(length)]
    out = []
    for i in range(length):
        from_visual = [attention[j][i] * live[j] for j in range(i, length) if visual[j] and valid[j]]
        from_text = [attention[t][i] * live[t] for t in range(length) if text[t]]
        s = sum(from_visual) / max(len(from_visual), 1)
        out.append((s + sum(from_text) / len(from_text)) / 2 if from_text else s)
    return out


def test_importance_equals_brute_force():
    generator = torch.Generator().manual_seed(0)
    length = 12
    valid = torch.tensor([[False, False] + [True] * 10, [True] * 12])
    visual = torch.zeros(2, length, dtype=torch.bool)
    visual[0, 4:9], visual[1, 1:10] = True, True
    text = torch.zeros_like(visual)
    text[0, 9:] = True  # sample 1 has no text after its image
    logits = torch.randn(2, length, length, generator=generator, dtype=torch.float64)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    attention = logits.masked_fill(~(causal & valid[:, None]), -math.inf).softmax(dim=-1).nan_to_num()
    got = importance(attention, visual, valid, text)
    for b in range(2):
        want = brute_importance(attention[b].tolist(), visual[b].tolist(), valid[b].tolist(), text[b].tolist())
        for i in visual[b].nonzero().squeeze(1).tolist():
            assert got[b, i].item() == pytest.approx(want[i], rel=1e-12)


def test_uniform_attention_scores_one():
    length = 8
    attention = torch.ones(length, length).tril()
    attention = (attention / attention.sum(dim=1, keepdim=True))[None]
    visual = torch.tensor([[False, True, True, True, True, False, False, False]])
    text = torch.tensor([[False] * 5 + [True] * 3])
    scores = importance(attention, visual, torch.ones_like(visual), text)
    torch.testing.assert_close(scores[visual], torch.ones(4))


def test_keep_rule_by_hand():
    visual = torch.tensor([[False, True, True, True, True, True, True, False]])
    scores = torch.tensor([[9.0, 0.1, 0.2, 2.0, 0.3, 0.4, 0.5, 0.0]])
    # stride 3 keeps visual ranks 0 and 3 (positions 1 and 4); the threshold 1.0 keeps position 3; text stays
    assert keep_rule(scores, visual, 1.0, 3).tolist() == [[True, True, False, True, True, False, False, True]]
    assert keep_rule(scores, visual, -math.inf, 5).all()
    assert keep_rule(scores, visual, math.inf, 1).all()


def test_quantile_threshold_keeps_the_wanted_count():
    scores = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.7])
    for wanted in range(6):
        assert int((scores > _quantile_threshold(scores, wanted)).sum()) == wanted
    assert _quantile_threshold(scores, -2) == math.inf


# the model -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llava():
    return tiny_llava("llava")


class Recording(ATP):
    seen: list = []

    def keep_mask(self, signal):
        Recording.seen.append(signal)
        return super().keep_mask(signal)


@torch.no_grad()
def test_attention_rows_equal_the_eager_attention():
    eager = tiny_llava("llava", attn="eager")
    inputs = llava_inputs(eager, PROMPTS[:2])
    attentions = eager(**inputs, output_attentions=True).attentions
    Recording.seen = []
    with tokred.applied(eager, Recording(layers=(2,), thresholds=0.5, strides=4)):
        eager(**inputs)
    seen = Recording.seen[0]
    valid = inputs["attention_mask"].bool()
    rows = valid[:, :, None] & valid[:, None, :]  # padding query rows are meaningless
    expected = attentions[1].mean(dim=1)
    torch.testing.assert_close(seen.attention[rows], expected[rows], atol=1e-6, rtol=1e-5)
    assert seen.layer == 2


@torch.no_grad()
def test_each_layer_prunes_by_its_rule_and_the_trace_has_per_sample_counts(llava):
    inputs = llava_inputs(llava, PROMPTS, seed=3)
    Recording.seen = []
    with tokred.applied(llava, Recording(**{f: getattr(PRUNING, f) for f in ("layers", "thresholds", "strides")})):
        llava(**inputs)
        trace = tokred.last_trace(llava)
    records = {r.layer: r for r in trace.layers if r.stage == "llm"}
    for index, signal in enumerate(Recording.seen):
        layer = PRUNING.layers[index]
        assert signal.layer == layer
        text = tokred.reducers.dart.text_after_image(signal)
        scores = importance(signal.attention, signal.visual, signal.valid, text)
        kept = keep_rule(scores, signal.visual, PRUNING.thresholds[index], PRUNING.strides[index]) & signal.valid
        assert records[layer].tokens_per_image == kept.sum(dim=1).tolist()
        assert records[layer].reducer_flops > 0
        if index:  # what the previous plan kept is what this one sees
            assert signal.valid.sum(dim=1).tolist() == records[PRUNING.layers[index - 1]].tokens_per_image
    assert len(Recording.seen) == 3 and trace.tokens("llm")[-1] < trace.tokens("llm")[0]


@torch.no_grad()
def test_text_is_never_pruned_and_positions_stay_original(llava):
    inputs = llava_inputs(llava, PROMPTS[:1])
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault(module.self_attn.layer_idx, kwargs["position_ids"][0].tolist())

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in llava.model.language_model.layers]
    try:
        with tokred.applied(llava, ATP(layers=(1, 3), thresholds=math.inf, strides=(2, 3))):
            llava(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    text = list(range(3)) + list(range(19, 24))
    # stride 2 keeps visual ranks 0, 2, .., 14 (8 tokens) before layer 1, stride 3 of those ranks 0, 3, 6 before 3
    assert seen[1] == seen[2] == [0, 1, 2] + list(range(3, 19, 2)) + text[3:]
    assert seen[3] == [0, 1, 2, 3, 9, 15] + text[3:]


@torch.no_grad()
def test_no_threshold_that_can_prune_is_the_unpatched_model(llava):
    inputs = llava_inputs(llava, PROMPTS)
    reference = llava(**inputs).logits
    reference_tokens = greedy_cached(llava, inputs, 3)
    with tokred.applied(llava, ATP(layers=(1, 2, 3))):
        assert torch.equal(llava(**inputs).logits, reference)
        assert torch.equal(greedy_cached(llava, inputs, 3), reference_tokens)
    valid = inputs["attention_mask"].bool()  # padding rows are not compared
    with tokred.applied(llava, ATP(layers=(1, 3), thresholds=-1e9, strides=1)):  # the engine, pruning nothing
        torch.testing.assert_close(llava(**inputs).logits[valid], reference[valid], atol=1e-5, rtol=1e-5)


def greedy_cached(model, inputs, steps, suppress=(IMAGE_TOKEN,)):
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, suppress_tokens=list(suppress),
                         pad_token_id=0)
    return out[:, inputs["input_ids"].shape[1]:]


def greedy_uncached(model, inputs, steps, suppress=(IMAGE_TOKEN,), extra_call=None):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    prompt_length = ids.shape[1]
    for _ in range(steps):
        call = dict(inputs, input_ids=ids, attention_mask=mask, **(extra_call(ids) if extra_call else {}))
        logits = model(**call, use_cache=False, prompt_length=prompt_length).logits[:, -1]
        logits[:, list(suppress)] = -torch.inf
        ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids[:, prompt_length:]


@torch.no_grad()
def test_llava_cached_equals_uncached_and_batch_equals_one_by_one(llava):
    batch = llava_inputs(llava, PROMPTS, seed=3)
    with tokred.applied(llava, PRUNING):
        logits = llava(**batch).logits[:, -1]
        tokens = greedy_cached(llava, batch, 4)
        assert torch.equal(tokens, greedy_uncached(llava, batch, 4))
        for i, prompt in enumerate(PROMPTS):
            single = llava_inputs(llava, [prompt], seed=3)
            single["pixel_values"] = batch["pixel_values"][i:i + 1]
            torch.testing.assert_close(llava(**single).logits[:, -1], logits[i:i + 1], atol=1e-5, rtol=1e-5)
            assert torch.equal(greedy_cached(llava, single, 4), tokens[i:i + 1])


@torch.no_grad()
def test_qwen2_vl_cached_equals_uncached_and_batch_equals_one_by_one():
    from helpers import QWEN_END, QWEN_IMAGE, QWEN_START

    model = tiny_qwen2_vl()
    prompts, grids = [([5, 6, 7], [8, 9, 10, 11]), ([12], [13, 14])], [[1, 8, 6], [1, 4, 4]]
    suppress = (2, QWEN_IMAGE, QWEN_START, QWEN_END)
    batch = qwen_inputs(prompts, grids, seed=3)
    with tokred.applied(model, ATP(layers=(1, 3), thresholds=(0.9, 1.1), strides=3)):
        logits = model(**batch).logits[:, -1]
        tokens = greedy_cached(model, batch, 4, suppress)
        types = lambda ids: {"mm_token_type_ids": (ids == QWEN_IMAGE).int()}  # noqa: E731
        assert torch.equal(tokens, greedy_uncached(model, batch, 4, suppress, types))
        assert tokred.last_trace(model).tokens("llm")[-1] < tokred.last_trace(model).tokens("llm")[0]
        start = 0
        for i in range(2):
            single = qwen_inputs(prompts[i:i + 1], grids[i:i + 1], seed=3)
            size = math.prod(grids[i])
            single["pixel_values"] = batch["pixel_values"][start:start + size]
            start += size
            torch.testing.assert_close(model(**single).logits[:, -1], logits[i:i + 1], atol=1e-5, rtol=1e-5)
            assert torch.equal(greedy_cached(model, single, 4, suppress), tokens[i:i + 1])


# calibration -----------------------------------------------------------------------------------------

def decoder_flops(model):
    """The language model's prefill FLOPs of the last forward without the reducer's own."""
    return sum(f for stage, part, f in tokred.flops(model).layers if stage == "llm_prefill" and part[5:].isdigit())


@torch.no_grad()
def test_calibration_reaches_the_flops_budget_without_labels(llava):
    data = [llava_inputs(llava, PROMPTS, seed=s) for s in range(3)]
    full = []
    with tokred.applied(llava, ATP(layers=(1,), thresholds=-1e9, strides=1)):  # the engine, pruning nothing
        for batch in data:
            llava(**batch)
            full.append(decoder_flops(llava))
    atp = tokred.calibrate(llava, data, reducer=ATP(layers=(1, 2, 3), strides=4), target_flops=0.7, progress=False)
    try:
        assert tokred.reducers_of(llava) == (atp,) and atp.layers == (1, 2, 3) and atp.strides == 4
        assert all(math.isfinite(t) for t in atp.thresholds)
        reduced = []
        for batch in data:
            llava(**batch)
            reduced.append(decoder_flops(llava))
        assert sum(reduced) / sum(full) == pytest.approx(0.7, abs=0.05)
        assert tokred.parse_spec(str(atp)) == (atp,)
    finally:
        tokred.remove(llava)


def test_bad_calibration_input_leaves_the_model_unpatched(llava):
    data = [llava_inputs(llava, PROMPTS[:1])]
    with pytest.raises(ValueError, match="unknown loss"):
        tokred.calibrate(llava, data, reducer=ATP(layers=(1,)), loss="cross_entropy")
    with pytest.raises(ValueError, match="target_flops"):
        tokred.calibrate(llava, data, reducer=ATP(layers=(1,)), target_flops=1.5)
    with pytest.raises(ValueError, match="decoder layers"):
        tokred.calibrate(llava, data, reducer=ATP(layers=(2, 8, 16)), target_flops=0.5)
    with pytest.raises(ValueError, match="below what this ATP can reach"):
        tokred.calibrate(llava, data, reducer=ATP(layers=(1,), strides=1), target_flops=0.5)
    with pytest.raises(ValueError, match="fits tokred.ATP"):
        tokred.calibrate(llava, data, reducer=tokred.FastV(keep=0.5))
    with pytest.raises(ValueError, match="not a one-shot iterator"):
        tokred.calibrate(llava, iter(data), reducer=ATP(layers=(1,)))
    assert "forward" not in llava.__dict__ and not tokred.reducers_of(llava)


# bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(layers=()), "non-empty"), (dict(layers=(0, 2)), "layer must be"), (dict(layers=(3, 2)), "increasing"),
    (dict(layers=(1, 2), thresholds=(0.5, 0.5, 0.5)), "3 ATP thresholds given for 2 layers"),
    (dict(layers=(1,), thresholds=math.nan), "thresholds must be numbers"),
    (dict(layers=(1,), strides=0), "strides must be ints"), (dict(layers=(1,), strides=2.0), "strides must be ints"),
    (dict(layers=(1,), positions="shift"), "positions must be"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ATP(**kwargs)


def test_layers_beyond_the_depth_leave_the_model_untouched(llava):
    with pytest.raises(ValueError, match=r"4 decoder layers; every layer K must be in 1\.\.3"):
        tokred.apply(llava, ATP(layers=(2, 8, 16), thresholds=1.0))
    assert "forward" not in llava.__dict__


def test_registry_spec_round_trip():
    assert tokred.reducer("atp", layers=(1, 2, 3), thresholds=0.5) == ATP(layers=(1, 2, 3), thresholds=0.5)
    assert tokred.parse_spec(str(PRUNING)) == (PRUNING,)
    assert tokred.parse_spec("atp:layers=(2;8;16)/thresholds=1.0/strides=8") == (ATP(thresholds=1.0),)
