"""PiToMe: energy and matching against brute force, the model-level rule, identities, bad input."""
import math

import pytest
import torch

import tokred
from tokred.signals import Signal
from helpers import brute_force_pitome, tiny_vit
from tokred.plan import follow
from tokred.reducers.pitome import PiToMe, default_margin, energy_matching, energy_scores


def test_energy_equals_brute_force():
    torch.manual_seed(0)
    metric = torch.randn(2, 9, 5, dtype=torch.float64)
    energy, _ = energy_scores(metric, margin=0.3, alpha=0.7)
    for b in range(2):
        for i in range(9):
            terms = []
            for j in range(9):
                v = torch.nn.functional.cosine_similarity(metric[b, i], metric[b, j], dim=0).item() - 0.3
                terms.append(v if v > 0 else 0.7 * (math.exp(v) - 1))
            assert energy[b, i].item() == pytest.approx(sum(terms) / 9, abs=1e-12)


@pytest.mark.parametrize("protect", [True, False])
@pytest.mark.parametrize("protected", [0, 1, 3])
@pytest.mark.parametrize("n,r,margin", [(17, 4, 0.5), (16, 7, 0.1), (12, 50, -0.2)])
def test_matching_equals_brute_force(protect, protected, n, r, margin):
    torch.manual_seed(n + 7 * protected)
    metric = torch.randn(3, n, 6, dtype=torch.float64)
    x = torch.randn(3, n, 4, dtype=torch.float64)
    size = torch.randint(1, 4, (3, n, 1)).double()
    plan = energy_matching(metric, r, protected, margin=margin, protect_low_energy=protect)
    out_x, out_size = plan.weighted_mean(x, size)
    source = follow(torch.arange(n).expand(3, n), plan)
    for i in range(3):
        want_x, want_size, want_groups = brute_force_pitome(metric[i], x[i], size[i], r, protected, margin,
                                                            protect_low_energy=protect)
        torch.testing.assert_close(out_x[i], want_x)
        torch.testing.assert_close(out_size[i], want_size)
        assert [sorted((source[i] == t).nonzero().flatten().tolist()) for t in range(out_x.shape[1])] == want_groups


def test_low_energy_tokens_are_protected():
    # four near-identical tokens (high energy) and two distinct ones (low energy)
    metric = torch.tensor([[1.0, 0, 0], [1, 0.01, 0], [0, 0, 1], [1, 0, 0.01], [0, 1, 0], [1, 0.02, 0]])[None]
    plan = energy_matching(metric, 2, num_protected=0, margin=0.5)
    assert set(plan.src.flatten().tolist()) <= {0, 1, 3, 5}
    assert {2, 4} <= set(plan.keep.flatten().tolist())


def test_reducer_schedule_and_variants():
    pitome = PiToMe(keep=0.9)
    signals = [Signal(torch.zeros(1, n, 4), None, 1, None) for n in (197, 100, 10)]
    # T counts the tokens after the class token: floor(196 - 176.4), floor(99 - 89.1), floor(9 - 8.1)
    assert [pitome.removes(0, 12, signal) for signal in signals] == [19, 9, 0]
    assert [pitome.protects_at(layer, 12) for layer in (0, 5, 6, 11)] == [False, False, True, True]
    assert [pitome.protects_at(layer, 7) for layer in (3, 4)] == [False, True]  # ceil(7 / 2) = 4 plain layers
    assert pitome.margin_at(6, 12) == default_margin(6, 12) == 0.375
    assert PiToMe(margin=[0.1, 0.2]).margin_at(1, 2) == 0.2


def _pitome_reference(model, images, reducer):
    """Model-level PiToMe written out with the brute-force rule (no proportional attention)."""
    from test_timm_adapter import reference_forward

    depth = len(model.blocks)

    def merge(layer, keys, x, size, protected):
        r = reducer.removes(layer, depth, Signal(x[None], None, protected, None))
        return brute_force_pitome(keys, x, size, r, protected, reducer.margin_at(layer, depth),
                                  reducer.alpha, reducer.protects_at(layer, depth))

    return reference_forward(model, images, merge, prop_attn=False)


@pytest.mark.parametrize("overrides", [{}, dict(reg_tokens=2, init_values=0.1), dict(class_token=False, global_pool="avg")])
def test_model_matches_reference(overrides, images):
    model = tiny_vit(**overrides)
    reducer = PiToMe(keep=0.8)
    with torch.no_grad():
        want = _pitome_reference(model, images, reducer)
        got = tokred.apply(model, reducer)(images)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    trace = tokred.last_trace(model)
    expected, prefix, n = [], model.num_prefix_tokens, 64
    for _ in range(4):
        n -= min(math.floor(n - n * 0.8), n // 2)
        expected.append(n + prefix)
    assert trace.tokens() == expected
    assert trace.sizes.sum(1).eq(64 + model.num_prefix_tokens).all()


@pytest.mark.parametrize("overrides,prefix", [({}, 1), (dict(reg_tokens=3), 4)])
def test_tokens_per_block_count_only_the_unprotected_tokens(overrides, prefix, images):
    """r = floor(T - 0.8 T) with T the patch tokens entering the block (64, 52, 42, 34), so
    12, 10, 8, 6 tokens go. Counting the class token too would give floor(65 - 52) = 13 first."""
    model = tokred.apply(tiny_vit(**overrides), PiToMe(keep=0.8))
    with torch.no_grad():
        model(images)
    assert tokred.last_trace(model).tokens() == [prefix + n for n in (52, 42, 34, 28)]


def test_keep_one_is_bit_identical(images):
    model = tiny_vit(init_values=0.1)
    with torch.no_grad():
        want = model(images)
        assert torch.equal(tokred.apply(model, PiToMe(keep=1.0))(images), want)


@pytest.mark.parametrize("kwargs,match", [
    (dict(keep=0), "keep"), (dict(keep=1.5), "keep"), (dict(keep=True), "keep"), (dict(keep="0.5"), "keep"),
    (dict(margin=float("nan")), "finite"), (dict(alpha=float("inf")), "finite"), (dict(margin=[0.1, "x"]), "finite"),
    (dict(alpha=0.0), "alpha"), (dict(protect_low_energy="yes"), "protect_low_energy"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PiToMe(**kwargs)


def test_margin_list_must_match_depth(images):
    model = tiny_vit()
    with pytest.raises(ValueError, match="3 margins"):
        tokred.apply(model, PiToMe(margin=[0.5] * 3))
    assert type(model).__name__ == "VisionTransformer"
