"""HoliTom: the segmentation program against every partition, the static set, DPC-KNN, the merges and the
whole outer stage against brute-force versions, the budget's rounding cases, the inner merge against the
reference's sequential loop, bad settings; then the model-level invariants on a tiny LLaVA-OneVision."""
import dataclasses
import itertools
import math

import pytest
import torch

import tokred
from helpers import (VIDEO_TOKEN, all_partitions, brute_force_cluster_merge, brute_force_dpc_knn,
                     brute_force_holitom, brute_force_inner_merge, brute_force_segment_score, llava_inputs,
                     onevision_video_inputs, tiny_llava, tiny_onevision, tiny_qwen2_vl)
from test_llava import greedy_cached, greedy_uncached
from test_qwen2_vl import greedy_cached as qwen_greedy_cached
from test_qwen2_vl import greedy_uncached as qwen_greedy_uncached
from test_qwen2_vl import make_inputs as qwen_make_inputs
from test_qwen2_vl import single_inputs as qwen_single_inputs
from test_video import counted
from tokred.plan import Plan
from tokred.reducers.holitom import (HoliTom, HoliTomInner, adjacent_similarity, cluster_weights, dpc_knn,
                                     inner_merge, retention, segment_frames, segment_gains, video_plan)
from tokred.signals import Layout, SequenceSignal


def _apply(plan, x):
    """Output features of a plan over the tokens x (B, N, C)."""
    return plan.weighted_mean(x, x.new_ones(*x.shape[:2], 1))[0] if plan.merges else plan.select(x)


# the segmentation program ------------------------------------------------------------------------

@pytest.mark.parametrize("frames", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("max_window", [1, 2, 3, 1024])
def test_segments_are_optimal_over_every_partition(frames, max_window):
    generator = torch.Generator().manual_seed(frames * 31 + max_window)
    for density in (0.3, 0.6, 0.9):
        static = torch.rand(frames - 1, 4, generator=generator) < density
        segments = segment_frames(static, max_window)
        assert [s for s, _ in segments] == [0] + [e + 1 for _, e in segments[:-1]] and segments[-1][1] == frames - 1
        assert all(e - s + 1 <= max_window for s, e in segments)
        best = max(brute_force_segment_score(static.tolist(), p) for p in all_partitions(frames, max_window))
        assert brute_force_segment_score(static.tolist(), segments) == best


def test_gains_count_the_chain_not_the_first_frame():
    # position 0 drifts: each adjacent pair is static, so it chains over 0..3; position 1 breaks at pair 1
    static = torch.tensor([[True, True], [True, False], [True, True]])
    gains = segment_gains(static)
    assert gains[0, 3] == 3 * 1 and gains[0, 1] == 1 * 2 and gains[2, 3] == 2 and gains[1, 3] == 2 * 1
    assert gains.diagonal().tolist() == [0] * 4 and gains.tril().sum() == 0


def test_ties_go_to_the_singleton_then_to_the_shortest_window():
    # pair (0,1) static at position 0, pair (1,2) at position 1: [01][2] and [0][12] both save 1;
    # at frame 2 the singleton (dp[1] = 1) is tried first and [12] (0 + 1) is not strictly better
    static = torch.tensor([[True, False], [False, True]])
    assert segment_frames(static) == [(0, 1), (2, 2)]
    # nothing static: all singletons, never a window that saves nothing
    assert segment_frames(torch.zeros(3, 2, dtype=torch.bool)) == [(0, 0), (1, 1), (2, 2), (3, 3)]


# the budget ----------------------------------------------------------------------------------------

def test_retention_order_changes_the_count_as_in_the_reference():
    # F=8, N=49, 24 positions static over all frames, r=0.16: the reference keeps 71 tokens, the other order 63
    share = retention(0.16, 8 * 49, 7 * 24)
    assert round(24 * share) + 8 * math.ceil(25 * share) == 71
    other = min(1.0, 0.16 * (8 * 49) / (8 * 49 - 7 * 24))
    assert round(24 * other) + 8 * math.ceil(25 * other) == 63


def _video(frames, positions, static_positions, channels=64, seed=0):
    """Features where ``static_positions`` barely change over time and every other position is random."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(frames, positions, channels, generator=generator)
    x[:, :static_positions] = x[0, :static_positions] + 0.01 * torch.randn(frames, static_positions, channels,
                                                                             generator=generator)
    return x, torch.rand(frames, positions, generator=generator)


@pytest.mark.parametrize("frames, positions, still, retain, expected", [
    (8, 49, 24, 0.16, 71),  # the spec's example: r' = 0.28000000000000003, ceil(25 r') = 8 per frame
    (2, 16, 5, 0.421875, 2 + 2 * 6),  # r' = 0.5 exactly: round(2.5) = 2 (half to even), ceil(5.5) = 6
    (2, 16, 7, 0.390625, 4 + 2 * 5),  # r' = 0.5: round(3.5) = 4, ceil(4.5) = 5
    (1, 100, 0, 0.07, 8),  # a single frame (an image): ceil(100 * 0.07) = ceil(7.000000000000001) = 8
])
def test_token_counts_follow_the_budget_formula(frames, positions, still, retain, expected):
    x, attention = _video(frames, positions, still)
    assert segment_frames(adjacent_similarity(x) > 0.65) == [(0, frames - 1)]
    keep = video_plan(x, attention, retain, 0.65)[0]
    assert len(keep) == expected and len(set(keep.tolist())) == expected


def test_a_static_region_rounded_to_zero_disappears():
    x, attention = _video(2, 16, 1)  # one static position; r' small: round(1 * r') = 0
    keep = video_plan(x, attention, 0.1, 0.65)[0]
    assert 0 not in keep.tolist() and 16 not in keep.tolist()


# DPC-KNN and the merges -------------------------------------------------------------------------

@pytest.mark.parametrize("num_tokens, clusters", [(5, 1), (9, 3), (24, 7), (30, 8), (40, 40)])
def test_dpc_knn_equals_brute_force(num_tokens, clusters):
    tokens = torch.randn(num_tokens, 16, generator=torch.Generator().manual_seed(num_tokens))
    centres, cluster = dpc_knn(tokens, clusters)
    expected_centres, expected_cluster = brute_force_dpc_knn(tokens, clusters, 7)
    assert centres.tolist() == expected_centres and cluster.tolist() == expected_cluster


def test_every_centre_is_in_its_own_cluster_even_beside_its_duplicate():
    tokens = torch.randn(5, 8, generator=torch.Generator().manual_seed(2)).repeat(2, 1)
    centres, cluster = dpc_knn(tokens, 10)
    assert centres.tolist() == list(range(10)) and cluster.tolist() == list(range(10))


def test_dpc_knn_ties_are_deterministic_and_leave_the_global_generator_alone():
    # duplicates and one cluster (k = 1: every density equal below 26 rows): the reference's torch.rand decides
    tokens = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).repeat(3, 1)
    state = torch.get_rng_state()
    first = dpc_knn(tokens, 1)
    torch.manual_seed(123)
    again = dpc_knn(tokens, 1)
    assert torch.equal(first[0], again[0]) and first[0].tolist() == brute_force_dpc_knn(tokens, 1, 7)[0]
    torch.set_rng_state(state)
    dpc_knn(tokens, 3)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("beta", [0.6, 0.0, 1.0])
def test_cluster_merge_equals_brute_force(beta):
    tokens = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    centres, cluster = dpc_knn(tokens, 4)
    merged = cluster_weights(centres, cluster, beta) @ tokens
    expected = brute_force_cluster_merge(tokens, centres.tolist(), cluster.tolist(), beta)
    torch.testing.assert_close(merged, torch.stack(expected))


@pytest.mark.parametrize("retain, tau", [(0.1, 0.65), (0.25, 0.8), (0.5, 0.3), (1.0, 0.65)])
def test_outer_stage_equals_brute_force(retain, tau):
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(3, 30, 16, generator=generator)  # three scenes, each held for a few frames
    x = base[[0, 0, 0, 1, 1, 2, 2, 2]] + 0.3 * torch.randn(8, 30, 16, generator=generator)
    attention = torch.rand(8, 30, generator=generator)
    segments = segment_frames(adjacent_similarity(x) > tau)
    assert any(e > s for s, e in segments)
    keep, src, dst, weight = video_plan(x, attention, retain, tau)
    plan = Plan(keep=keep[None], num_inputs=240, src=src[None], dst=dst[None], weight=weight[None])
    got = _apply(plan, x.reshape(1, 240, 16))[0]
    expected = brute_force_holitom(x, attention, segments, retain, tau)
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=1e-5)
    # every input token is in at most one output token, and the sizes count the tokens each stands for
    used = torch.cat([keep, src])
    assert len(set(used.tolist())) == len(used)
    assert plan.sum(torch.ones(1, 240, 1)).sum() == len(used)


def test_keep_everything_is_the_identity_in_order():
    x, attention = _video(4, 16, 6)
    keep, src, _, _ = video_plan(x, attention, 1.0, 1.0)
    assert keep.tolist() == list(range(64)) and len(src) == 0


def test_contextual_tokens_follow_each_frames_dominant_tokens():
    x, attention = _video(3, 16, 0, seed=2)
    keep, src, dst, weight = video_plan(x, attention, 0.5, 0.99, contextual=0.3)
    # no static positions (tau 0.99): each frame keeps ceil(8) = 8: round(8 * 0.7) = 6 dominant + 2 clusters
    assert len(keep) == 24 and bool(((keep[:-1] // 16) <= (keep[1:] // 16)).all())
    for f in range(3):
        frame = keep[8 * f:8 * f + 8]
        assert bool((frame // 16 == f).all())
        top = torch.sort(attention[f], descending=True, stable=True).indices[:6].sort().values
        assert frame[:6].tolist() == (top + 16 * f).tolist()
    # the other 10 tokens of every frame merge into its two clusters, with beta-weighted shares
    assert len(src) == 3 * 8 and bool((dst >= 0).all()) and bool((weight > 0).all())


# the inner stage ------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 4, 13, 20])
def test_inner_merge_equals_the_sequential_loop(k):
    generator = torch.Generator().manual_seed(k)
    hidden = torch.randn(30, 8, generator=generator, dtype=torch.float64)
    hidden[10:14] = hidden[6]  # duplicates: cosine ties go to the kept token with more attention
    attention = torch.rand(30, generator=generator)
    visual = torch.zeros(30, dtype=torch.bool)
    visual[4:24] = True
    merge_into, weight = inner_merge(hidden, attention, visual, k)
    kept, expected = brute_force_inner_merge(hidden, attention, visual, k)
    text = set(range(30)) - set(range(4, 24))
    assert (merge_into < 0).nonzero().squeeze(1).tolist() == sorted(set(kept) | text)
    assert bool((weight[merge_into < 0] == 0).all()) and bool((weight[merge_into >= 0] > 0).all())
    signal = SequenceSignal(hidden=hidden[None], visual=visual[None], valid=torch.ones(1, 30, dtype=torch.bool),
                            prompt=torch.ones(1, 30, dtype=torch.bool), last_attention=attention[None],
                            residual=hidden[None])
    plan = HoliTomInner(keep=k, layer=2).plan_sequence(signal)
    got = _apply(plan, hidden[None])[0]
    survivors = plan.keep[0].tolist()
    torch.testing.assert_close(got, expected[survivors])


def test_inner_merge_compares_the_residual_stream_not_the_normed_states():
    # a norm weight that changes which kept token is most similar: the reference compares before the norm
    generator = torch.Generator().manual_seed(5)
    residual = torch.randn(1, 24, 8, generator=generator, dtype=torch.float64)
    normed = residual * torch.rand(8, generator=generator, dtype=torch.float64) * 3
    attention = torch.rand(1, 24, generator=generator)
    visual = torch.ones(1, 24, dtype=torch.bool)
    signal = SequenceSignal(hidden=normed, visual=visual, valid=visual, prompt=visual, last_attention=attention,
                            residual=residual)
    plan = HoliTomInner(keep=6, layer=2).plan_sequence(signal)
    on_normed = HoliTomInner(keep=6, layer=2).plan_sequence(dataclasses.replace(signal, residual=normed))
    assert not torch.equal(plan.destinations(), on_normed.destinations())  # the norm changes the targets
    kept, expected = brute_force_inner_merge(residual[0], attention[0], visual[0], 6)
    torch.testing.assert_close(_apply(plan, residual)[0], expected[kept])
    with pytest.raises(ValueError, match="residual"):
        HoliTomInner(keep=6, layer=2).plan_sequence(SequenceSignal(normed, visual, visual, visual,
                                                                   last_attention=attention))


def test_inner_merge_of_a_batch_is_each_sample_alone():
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 20, 8, generator=generator)
    attention = torch.rand(2, 20, generator=generator)
    visual = torch.zeros(2, 20, dtype=torch.bool)
    visual[0, 3:15], visual[1, 8:18] = True, True
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, :5] = False
    signal = SequenceSignal(hidden=hidden, visual=visual, valid=valid, prompt=valid, last_attention=attention,
                            residual=hidden)
    reducer = HoliTomInner(keep=0.5, layer=2)
    batch = _apply(reducer.plan_sequence(signal), hidden)
    for b in range(2):
        row = slice(b, b + 1)
        alone = SequenceSignal(hidden=hidden[row, valid[b]], visual=visual[row, valid[b]], valid=valid[row, valid[b]],
                               prompt=valid[row, valid[b]], last_attention=attention[row, valid[b]],
                               residual=hidden[row, valid[b]])
        single = _apply(reducer.plan_sequence(alone), hidden[row, valid[b]])[0]
        torch.testing.assert_close(batch[b, -single.shape[0]:], single)


# bad settings -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(tau=1.5), "tau must be a number in \\[-1, 1\\]"), (dict(tau=-1.01), "tau"),
    (dict(retain=0.0), "retain must be a number in \\(0, 1\\]"), (dict(retain=1.5), "retain"),
    (dict(retain=True), "retain"), (dict(beta=1.2), "beta"), (dict(neighbours=0), "neighbours"),
    (dict(contextual=1.0), "contextual"), (dict(max_window=0), "max_window"), (dict(positions="gaps"), "positions"),
])
def test_bad_outer_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HoliTom(**kwargs)


@pytest.mark.parametrize("kwargs, message", [(dict(keep=0.0), "keep"), (dict(layer=0), "layer"),
                                             (dict(positions="gaps"), "positions")])
def test_bad_inner_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HoliTomInner(**kwargs)


def test_outer_stage_needs_the_tower_attention_and_a_grid():
    x = torch.randn(1, 32, 8)
    with pytest.raises(ValueError, match="received"):
        HoliTom().plan_images(x, Layout(2, 4, 4))
    with pytest.raises(ValueError, match="grid"):
        HoliTom().plan_images(x, None, received=torch.rand(1, 32))
    with pytest.raises(ValueError, match="non-finite"):
        HoliTom().plan_images(x, Layout(2, 4, 4), received=torch.full((1, 32), float("nan")))


def test_a_batch_of_videos_is_each_video_alone():
    videos = [_video(4, 16, s, channels=16, seed=s) for s in (0, 5, 12)]
    x = torch.stack([v[0].reshape(64, 16) for v in videos])
    received = torch.stack([v[1].reshape(64) for v in videos])
    plan = HoliTom(retain=0.3).plan_images(x, Layout(4, 4, 4), received=received)
    out = _apply(plan, x)
    for g in range(3):
        alone = HoliTom(retain=0.3).plan_images(x[g:g + 1], Layout(4, 4, 4), received=received[g:g + 1])
        assert plan.keep[g, :alone.num_outputs].tolist() == alone.keep[0].tolist()
        assert bool((plan.keep[g, alone.num_outputs:] == 64).all())
        torch.testing.assert_close(out[g, :alone.num_outputs], _apply(alone, x[g:g + 1])[0])


def test_segment_search_is_exhaustive_for_all_small_inputs():
    # every static pattern of 4 frames and one position against every partition
    for bits in itertools.product([False, True], repeat=3):
        static = torch.tensor(bits)[:, None]
        best = max(brute_force_segment_score(static.tolist(), p) for p in all_partitions(4, 1024))
        assert brute_force_segment_score(static.tolist(), segment_frames(static)) == best


# on a tiny LLaVA-OneVision ------------------------------------------------------------------------------

PROMPTS = [([1, 2, 3], [4, 5, 6, 7, 8]), ([9], [10, 11])]  # different lengths: the second is left-padded
SETS = {
    "outer": (HoliTom(retain=0.3),),
    "inner": (HoliTomInner(keep=0.3, layer=2),),
    "both": (HoliTom(retain=0.3), HoliTomInner(keep=0.5, layer=2)),
    "contextual": (HoliTom(retain=0.4, tau=0.5, contextual=0.5, neighbours=3), HoliTomInner(keep=3, layer=1)),
}


def video_inputs(prompts, seed=0):
    """Left-padded OneVision inputs with a 4-frame video per sample whose frames 0-2 are one scene (a
    little noise apart) and frame 3 another, so that HoliTom finds a segment with static positions."""
    inputs = onevision_video_inputs(prompts, frames=4, seed=seed)
    video = inputs["pixel_values_videos"]
    video[:, 1:3] = video[:, :1] + 0.05 * torch.randn(video[:, 1:3].shape, generator=torch.Generator().manual_seed(1))
    return inputs


@pytest.fixture(scope="module")
def model():
    return tiny_onevision()


@torch.no_grad()
def test_the_model_finds_static_tokens(model):
    inputs = video_inputs(PROMPTS[:1])
    with tokred.applied(model, HoliTom(retain=1.0)):
        model(**inputs)
        # 64 video tokens and the newline: a segment of frames 0-2 merges its static positions
        projector = next(r for r in tokred.last_trace(model).layers if r.stage == "projector")
        assert projector.tokens_per_image[0] < 65


@pytest.mark.parametrize("positions", [None, "keep"])
@torch.no_grad()
def test_the_model_runs_on_holitoms_reduction_of_its_own_features(positions):
    """The oracle: the unpatched model fed the video tokens :func:`video_plan` makes of the model's own
    pooled features and eager tower attention, then the newline: with renumbered positions (the default)
    in the spec's order (per segment its static clusters, then each frame's kept tokens); with
    ``positions="keep"`` each at its own placeholder's place and position id."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    eager = tiny_onevision(attn="eager")
    inputs = onevision_video_inputs(PROMPTS[:1], frames=4, seed=4)
    pixels = inputs["pixel_values_videos"]  # frames 1-2 repeat the left half of frame 0: static and moving
    noise = torch.randn(1, 2, 3, 56, 28, generator=torch.Generator().manual_seed(1))  # positions interleave
    pixels[:, 1:3, ..., :28] = pixels[:, :1, ..., :28] + 0.05 * noise
    pooled = eager.model.get_video_features(pixel_values_videos=pixels, vision_feature_layer=-1,
                                            vision_feature_select_strategy="full", return_dict=True).pooler_output
    attention = eager.model.vision_tower(pixels.flatten(0, 1), output_attentions=True).attentions[-1]
    received = eager.model.apply_pooling(attention.mean(dim=(1, 2))[..., None])[..., 0]  # (F, 16)
    keep, src, dst, weight = video_plan(pooled[0, :-1].view(4, 16, -1), received, 0.3, 0.65)
    plan = Plan(keep=keep[None], num_inputs=64, src=src[None], dst=dst[None], weight=weight[None])
    tokens = _apply(plan, pooled[:, :-1])[0]  # in the plan's order
    assert len(src) > 0  # static positions merged
    assert not torch.equal(keep, keep.sort().values)  # the spec's order is not the order of the positions
    ids = inputs["input_ids"][0].tolist()
    first = ids.index(VIDEO_TOKEN)
    places = list(range(first)) + (first + keep.sort().values).tolist() + list(range(first + 64, len(ids)))
    ids = ids[:first] + [VIDEO_TOKEN] * (len(keep) + 1) + ids[first + 65:]
    extra = {}
    if positions == "keep":
        tokens, extra["position_ids"] = tokens[keep.argsort()], torch.tensor([places])
    features = BaseModelOutputWithPooling(pooler_output=torch.cat([tokens, pooled[0, -1:]])[None])
    want = eager(input_ids=torch.tensor([ids]), mm_encoder_outputs={"video": features}, **extra).logits[:, -1]
    with tokred.applied(eager, HoliTom(retain=0.3, tau=0.65, positions=positions)):
        torch.testing.assert_close(eager(**inputs).logits[:, -1], want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_the_inner_stage_sees_the_residual_stream_entering_layer_k(model, monkeypatch):
    inputs = video_inputs(PROMPTS[:1])
    entering = []
    hook = model.model.language_model.layers[2].register_forward_pre_hook(
        lambda module, args, kwargs: entering.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        model(**inputs)
    finally:
        hook.remove()
    signals = []
    plan_sequence = HoliTomInner.plan_sequence
    monkeypatch.setattr(HoliTomInner, "plan_sequence", lambda self, signal: signals.append(signal) or
                        plan_sequence(self, signal))
    with tokred.applied(model, HoliTomInner(keep=0.5, layer=2)):
        model(**inputs)
    torch.testing.assert_close(signals[0].residual, entering[0])
    torch.testing.assert_close(signals[0].hidden, model.model.language_model.norm(entering[0]))


def _logits_after(model, hidden, positions, layer):
    """Last-row logits of ``model`` when ``hidden`` (1, L, C), at ``positions`` (1, L), enters decoder
    ``layer`` of its language model: the remaining layers, causal, then the norm and the LM head."""
    language_model = model.model.language_model
    mask = torch.full((hidden.shape[1],) * 2, float("-inf")).triu(1)[None, None]
    embeddings = language_model.rotary_emb(hidden, positions)
    for decoder in language_model.layers[layer:]:
        hidden = decoder(hidden, attention_mask=mask, position_ids=positions, position_embeddings=embeddings)
    return model.lm_head(language_model.norm(hidden))[:, -1]


@torch.no_grad()
def test_the_inner_stage_spans_the_newline_as_the_reference():
    """The oracle: the unpatched model's hidden states entering layer K and its last token's attention at
    K - 1 (eager); the reference's loop (:func:`brute_force_inner_merge`) over the video's 16F + 1 tokens,
    newline included, keeping round(keep (16F + 1)); the remaining layers on the kept tokens at their
    original positions. The newline is dropped (merged into a kept token) in some cases, kept in others."""
    eager = tiny_onevision(attn="eager")
    layer, frames, fates = 2, 3, set()
    for seed, keep in itertools.product(range(3), (0.3, 0.5, 0.8)):
        inputs = onevision_video_inputs(PROMPTS[:1], frames=frames, seed=seed)
        out = eager(**inputs, output_attentions=True, output_hidden_states=True)
        hidden, attention = out.hidden_states[layer][0], out.attentions[layer - 1][0, :, -1].mean(dim=0)
        span = inputs["input_ids"][0] == VIDEO_TOKEN  # the 16F tokens and the newline after them
        assert int(span.sum()) == 16 * frames + 1
        kept_visual, merged = brute_force_inner_merge(hidden, attention, span, round(keep * (16 * frames + 1)))
        newline = int(span.nonzero().max())
        fates.add(newline in kept_visual)
        kept = sorted(kept_visual + (~span).nonzero().squeeze(1).tolist())
        want = _logits_after(eager, merged[kept].float()[None], torch.tensor([kept]), layer)
        with tokred.applied(eager, HoliTomInner(keep=keep, layer=layer)):
            torch.testing.assert_close(eager(**inputs).logits[:, -1], want, atol=1e-5, rtol=1e-5)
            assert tokred.last_trace(eager).tokens("llm")[layer] == len(kept)
    assert round(0.3 * 49) != round(0.3 * 48) and fates == {True, False}


@torch.no_grad()
def test_keeping_every_token_of_the_span_is_the_unpatched_model(model):
    """Through the engine (a count, not 1.0): the newline is in the span, so the count is 16F + 1.
    Logits compared on the real tokens (padding rows mean nothing)."""
    inputs = video_inputs(PROMPTS)
    real = inputs["attention_mask"].bool()
    reference, tokens = model(**inputs).logits[real], greedy_cached(model, inputs, 4)
    with tokred.applied(model, HoliTomInner(keep=16 * 4 + 1, layer=2)):
        torch.testing.assert_close(model(**inputs).logits[real], reference, atol=1e-5, rtol=1e-5)
        assert torch.equal(greedy_cached(model, inputs, 4), tokens)
        assert tokred.last_trace(model).tokens("llm")[2] == inputs["input_ids"].shape[1]


@torch.no_grad()
def test_keep_everything_is_the_unpatched_model(model):
    inputs = video_inputs(PROMPTS)
    reference, tokens = model(**inputs).logits, greedy_cached(model, inputs, 4)
    with tokred.applied(model, HoliTom(retain=1.0, tau=1.0), HoliTomInner(keep=1.0, layer=2)):
        assert torch.equal(model(**inputs).logits, reference)
        assert torch.equal(greedy_cached(model, inputs, 4), tokens)
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("name", SETS)
@torch.no_grad()
def test_cached_generation_equals_uncached(model, name):
    inputs = video_inputs(PROMPTS)
    with tokred.applied(model, *SETS[name]):
        assert torch.equal(greedy_cached(model, inputs, 4), greedy_uncached(model, inputs, 4))


@pytest.mark.parametrize("name", SETS)
@torch.no_grad()
def test_batch_equals_one_by_one(model, name):
    # the reference assumes one sample: one r' for all videos, sample 0's span and keep set for every row
    batch = video_inputs(PROMPTS, seed=3)
    with tokred.applied(model, *SETS[name]):
        logits = model(**batch).logits[:, -1]
        tokens = greedy_cached(model, batch, 3)
        for i, prompt in enumerate(PROMPTS):
            single = video_inputs([prompt], seed=3)
            single["pixel_values_videos"] = batch["pixel_values_videos"][i:i + 1]
            torch.testing.assert_close(model(**single).logits[:, -1], logits[i:i + 1], atol=1e-5, rtol=1e-5)
            assert torch.equal(greedy_cached(model, single, 3), tokens[i:i + 1])


def test_flops_match_the_flop_counter(model):
    # the inner stage's dropped x kept similarities are a matmul (reported); the outer stage's similarities are
    # elementwise and DPC-KNN's distances (16 rows here) no matmul: reported as 0, and the counter sees none
    inputs = video_inputs(PROMPTS)
    with torch.no_grad(), tokred.applied(model, *SETS["both"]):
        measured = counted(lambda: model(**inputs))
        report = tokred.flops(model)
    assert any(part == "layer2.reducer" and flops > 0 for _, part, flops in report.layers)
    assert report.total == measured


@torch.no_grad()
def test_ties_do_not_touch_the_global_generator(model):
    # identical frames: every position static, one cluster per segment at small retain: all densities tie
    inputs = onevision_video_inputs(PROMPTS[:1], frames=4)
    inputs["pixel_values_videos"][:, 1:] = inputs["pixel_values_videos"][:, :1]
    with tokred.applied(model, HoliTom(retain=0.02), HoliTomInner(keep=0.5, layer=2)):
        torch.manual_seed(0)
        state = torch.get_rng_state()
        first = model(**inputs).logits
        assert torch.equal(torch.get_rng_state(), state)
        torch.manual_seed(1)
        assert torch.equal(model(**inputs).logits, first)


@torch.no_grad()
def test_images_get_a_clear_error_or_the_inner_stage():
    # the reference crashes on image inputs; here the outer stage says what it needs, the inner one works
    llava = tiny_llava("llava")
    with pytest.raises(ValueError, match="tower's attention"):
        tokred.apply(llava, HoliTom())
    assert "forward" not in llava.__dict__
    inputs = llava_inputs(llava, PROMPTS)
    with tokred.applied(llava, HoliTomInner(keep=0.5, layer=2)):
        assert torch.equal(greedy_cached(llava, inputs, 3), greedy_uncached(llava, inputs, 3))
        assert tokred.last_trace(llava).layers[-1].tokens_in < inputs["input_ids"].shape[1]
    onevision = tiny_llava("llava_onevision")
    with tokred.applied(onevision, HoliTom()), pytest.raises(ValueError, match="tower"):
        onevision(**llava_inputs(onevision, PROMPTS))


def test_inner_layer_beyond_the_model_is_refused(model):
    with pytest.raises(ValueError, match="4 decoder layers"):
        tokred.apply(model, HoliTom(), HoliTomInner())  # K = 18 of LLaVA-OneVision-7B's 28
    assert "forward" not in model.__dict__


# on tiny Qwen2-VL / Qwen2.5-VL: an image (a one-frame video) and videos of 2 and 3 temporal patches ---------

@pytest.fixture(scope="module")
def qwen_models():
    return {kind: tiny_qwen2_vl(kind) for kind in ("qwen2_vl", "qwen2_5_vl")}


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
@torch.no_grad()
def test_qwen2_vl_images_and_videos(qwen_models, kind):
    model = qwen_models[kind]
    batch = qwen_make_inputs("videos", seed=3)
    reference = model(**batch).logits
    with tokred.applied(model, HoliTom(retain=1.0, tau=1.0), HoliTomInner(keep=1.0, layer=2)):
        assert torch.equal(model(**batch).logits, reference)
    with tokred.applied(model, HoliTom(retain=0.4, tau=0.3), HoliTomInner(keep=0.5, layer=2)):
        logits = model(**batch).logits[:, -1]
        projector = next(r for r in tokred.last_trace(model).layers if r.stage == "projector")
        assert projector.tokens_out < projector.tokens_in
        assert torch.equal(qwen_greedy_cached(model, batch, 3), qwen_greedy_uncached(model, batch, 3))
        for i in range(2):
            single = qwen_single_inputs("videos", batch, i)
            torch.testing.assert_close(model(**single).logits[:, -1], logits[i:i + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec, reducers", [
    ("holitom+holitom_inner", (HoliTom(), HoliTomInner())),
    ("holitom:retain=0.25/tau=0.8+holitom_inner:keep=3/layer=2",
     (HoliTom(retain=0.25, tau=0.8), HoliTomInner(keep=3, layer=2))),
    ("holitom:neighbours=3/contextual=0.5/positions=keep", (HoliTom(contextual=0.5, neighbours=3, positions="keep"),)),
])
def test_specs_round_trip(spec, reducers):
    assert tokred.parse_spec(spec) == reducers
    assert "+".join(str(r) for r in reducers) == spec
