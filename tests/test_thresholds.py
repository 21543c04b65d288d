"""Learned-threshold merging and pruning: the hard rule against brute force, variable token
counts per image, identities and bad input."""
import math

import pytest
import torch

import tokred
from helpers import tiny_vit
from tokred.signals import Heads, Signal
from tokred.plan import follow
from tokred.reducers.thresholds import Thresholds, threshold_plan


def brute_force_thresholds(q, k, scale, sizes, protected, merge, prune):
    """The hard rule for one image, token by token: returns the groups of input tokens per output.
    Attention is proportional (log size added to the logits), so size-0 tokens are invisible;
    A and B alternate over the live tokens. When every live patch token would go, the most
    important one stays."""
    n = q.shape[1]
    alive = [size > 0 for size in sizes]
    live = [j for j in range(n) if alive[j]]
    logits = q @ k.transpose(-1, -2) * scale + torch.tensor([math.log(s) if s > 0 else -math.inf for s in sizes])
    attention = logits.softmax(-1)
    importance = {j: len(live) * attention[:, live, j].mean().item() for j in range(n)}
    pruned = {j for j in live if j >= protected and importance[j] < prune}
    keys = k.mean(0)
    merged = {}
    a_tokens = [j for rank, j in enumerate(live) if rank >= protected and rank % 2 == 0]
    b_tokens = [j for rank, j in enumerate(live) if rank >= protected and rank % 2 == 1]
    for a in a_tokens:
        if a in pruned:
            continue
        scores = [torch.nn.functional.cosine_similarity(keys[a], keys[b], dim=0).item() for b in b_tokens]
        best = max(scores)
        target = b_tokens[scores.index(best)]
        if best > merge and target not in pruned:
            merged[a] = target
    survivors = [j for j in live if j not in pruned and j not in merged]
    patches = [j for j in live if j >= protected]
    if patches and not any(j >= protected for j in survivors):
        spared = max(patches, key=lambda j: importance[j])
        pruned.discard(spared)
        merged.pop(spared, None)
        survivors = sorted(survivors + [spared])
    return [sorted([j] + [a for a, t in merged.items() if t == j]) for j in survivors]


@pytest.mark.parametrize("merge,prune", [(0.2, 0.6), (0.5, -math.inf), (math.inf, 0.9), (-1.0, 0.0), (-1.0, 100.0)])
@pytest.mark.parametrize("protected", [1, 2])
def test_hard_rule_equals_brute_force(merge, prune, protected):
    torch.manual_seed(protected)
    batch, heads, n, dim = 3, 2, 15, 4
    q, k = torch.randn(batch, heads, n, dim, dtype=torch.float64), torch.randn(batch, heads, n, dim, dtype=torch.float64)
    sizes = torch.randint(0, 3, (batch, n, 1)).double()
    sizes[:, :protected] = 1
    bias = sizes[..., 0].clamp_min(torch.finfo(torch.float64).tiny).log()[:, None, None, :]
    signal = Signal(torch.randn(batch, n, 6, dtype=torch.float64), k.mean(1), protected, None,
                    Heads(q, k, dim ** -0.5, bias), sizes)
    plan = threshold_plan(signal, merge, prune)
    source = follow(torch.arange(n).expand(batch, n), plan)
    for i in range(batch):
        q_i, k_i = q[i].clone(), k[i].clone()
        want = brute_force_thresholds(q_i, k_i, dim ** -0.5, sizes[i, :, 0].tolist(), protected, merge, prune)
        got = [sorted((source[i] == t).nonzero().flatten().tolist()) for t in range(plan.num_outputs)]
        assert [g for g in got if g] == want
    out_x, out_size = plan.weighted_mean(signal.tokens, sizes)
    assert torch.allclose(out_size.sum(1), sizes.sum(1) - _pruned_mass(sizes, source))


def _pruned_mass(sizes, source):
    gone = source < 0
    return (sizes[..., 0] * gone).sum(1, keepdim=True)


def test_batch_with_different_token_counts_equals_images_one_by_one():
    torch.manual_seed(4)
    images = torch.randn(4, 3, 32, 32)
    model = tokred.apply(tiny_vit(init_values=0.3), Thresholds(merge=0.3, prune=[0.5, 0.7, 0.9, 0.9]))
    with torch.no_grad():
        batched = model(images)
        trace = tokred.last_trace(model)
        singles = []
        for i in range(4):
            singles.append(model(images[i:i + 1]))
            assert tokred.last_trace(model).final_tokens == trace.layers[-1].tokens_per_image[i]
    assert len(set(trace.layers[-1].tokens_per_image)) > 1  # images really kept different numbers
    torch.testing.assert_close(torch.cat(singles), batched, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pool", ["avg", "avgmax", "max"])
def test_pooling_ignores_padding(pool):
    torch.manual_seed(5)
    images = torch.randn(3, 3, 32, 32)
    model = tokred.apply(tiny_vit(class_token=False, global_pool=pool), Thresholds(merge=0.2, prune=0.8))
    with torch.no_grad():
        batched = model(images)
        singles = torch.cat([model(images[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(singles, batched, atol=1e-5, rtol=1e-4)


def test_infinite_thresholds_are_bit_identical(images):
    model = tiny_vit(init_values=0.1)
    with torch.no_grad():
        want = model(images)
        assert torch.equal(tokred.apply(model, Thresholds())(images), want)


def test_flops_follow_the_padded_lengths(images):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = tokred.apply(tiny_vit(), Thresholds(merge=0.3, prune=0.7))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images)
    assert counter.get_total_flops() == tokred.flops(model).total


@pytest.mark.parametrize("kwargs,match", [
    (dict(merge=float("nan")), "merge"), (dict(prune=[0.1, "x"]), "prune"), (dict(temperature=0), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(merge=True), "merge"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Thresholds(**kwargs)


def test_threshold_lists_must_match_depth():
    model = tiny_vit()
    with pytest.raises(ValueError, match="3 prune thresholds"):
        tokred.apply(model, Thresholds(prune=[0.1] * 3))
    assert type(model).__name__ == "VisionTransformer"


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_hf_towers_with_different_token_counts_equal_one_by_one(family):
    transformers = pytest.importorskip("transformers")
    kwargs = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  image_size=32, patch_size=4, attn_implementation="sdpa")
    torch.manual_seed(0)
    if family == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**kwargs)).eval()
    else:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**kwargs)).eval()
    torch.manual_seed(7)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = model(pixel_values=images).pooler_output
        tokred.apply(model, Thresholds())
        assert torch.equal(model(pixel_values=images).pooler_output, want)
        tokred.apply(model, Thresholds(merge=0.2, prune=0.8))
        batched = model(pixel_values=images).pooler_output
        counts = tokred.last_trace(model).layers[-1].tokens_per_image
        singles = torch.cat([model(pixel_values=images[i:i + 1]).pooler_output for i in range(4)])
    assert counts is not None and len(set(counts)) > 1
    torch.testing.assert_close(singles, batched, atol=1e-5, rtol=1e-4)


def test_an_image_without_protected_tokens_keeps_its_most_important_token():
    torch.manual_seed(3)
    q, k = torch.randn(2, 2, 9, 4), torch.randn(2, 2, 9, 4)
    signal = Signal(torch.randn(2, 9, 4), k.mean(1), 0, None, Heads(q, k, 0.5, None), None)
    plan = threshold_plan(signal, merge_threshold=-1.0, prune_threshold=100.0)  # everything would go
    importance = Heads(q, k, 0.5, None).received()
    assert plan.keep.tolist() == importance.argmax(dim=1, keepdim=True).tolist()


def _avg_pooled_models():
    from tiny_families import tiny_eva

    yield "timm_avg", tiny_vit(global_pool="avg"), lambda model, x: model(x)
    yield "eva", tiny_eva(), lambda model, x: model(x)
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=4, width=48, layers=3,
                                                              head_width=16, pool_type="avg"),
                                text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1)).eval()
    yield "open_clip_avg", clip, lambda model, x: model.encode_image(x)


@pytest.mark.parametrize("name", ["timm_avg", "eva", "open_clip_avg"])
def test_pruning_every_patch_token_keeps_one_per_image_and_stays_finite(name):
    """Average pooling over no patch token would be NaN: the most important patch token stays."""
    _, model, run = next(m for m in _avg_pooled_models() if m[0] == name)
    torch.manual_seed(2)
    images = torch.randn(3, 3, 32, 32)
    tokred.apply(model, Thresholds(merge=-1.0, prune=1e9))
    with torch.no_grad():
        out = run(model, images)
    trace = tokred.last_trace(model)
    assert torch.isfinite(out).all()
    last = trace.layers[-1]
    assert last.tokens_out == trace.num_prefix + 1 and last.tokens_per_image in (None, [trace.num_prefix + 1] * 3)


def test_an_empty_batch_gives_an_empty_output_like_the_unpatched_model():
    model = tiny_vit()
    empty = torch.zeros(0, 3, 32, 32)
    with torch.no_grad():
        want = model(empty)
        got = tokred.apply(model, Thresholds(merge=0.3, prune=0.7))(empty)
        assert got.shape == want.shape == (0, 7)
        assert tokred.last_trace(model).tokens() == [65] * 4  # nothing to reduce
        images = torch.randn(2, 3, 32, 32)
        assert model(images).shape == (2, 7)  # still usable
    q = k = torch.zeros(0, 2, 9, 4)
    plan = threshold_plan(Signal(torch.zeros(0, 9, 4), k.mean(1), 1, None, Heads(q, k, 0.5, None), None), 0.3, 0.7)
    assert plan.keep.shape == (0, 9) and not plan.merges and not plan.padded


def test_overflowing_importance_is_refused():
    """float16 logits overflow to inf, so the softmax and the importance become NaN: refused, not ranked."""
    q = k = torch.full((1, 2, 5, 4), 200.0, dtype=torch.float16)  # q.k = 160000 > float16's largest, 65504
    signal = Signal(torch.zeros(1, 5, 4, dtype=torch.float16), k.mean(1), 1, None, Heads(q, k, 1.0, None), None)
    with pytest.raises(ValueError, match="^Thresholds: .*non-finite.*importance"):
        threshold_plan(signal, 0.3, 0.7)
