"""Budget: per-image keep from content. The signals against brute force, the calibration contract
(mean = target, keep monotone in the signal), every reducer with a keep driven by it, bad input."""
import math

import pytest
import torch

import tokred
from tokred import registry
from helpers import clustered, llava_inputs, tiny_llava, tiny_vit
from test_llava import greedy_cached, greedy_uncached
from tokred.reducers.budget import (Budget, cls_outliers, distortion, distortion_keep, jpeg_bytes_per_pixel,
                                    kept_counts)
from tokred.reducers.divprune import greedy_order

PROMPTS = [([1, 2, 3], [4, 5, 6, 7, 8]), ([9], [10, 11]), ([5, 6], [7])]


# the signals ------------------------------------------------------------------------------------------

def brute_distortion(x, order, k):
    x = x.double()
    unit = [v / v.norm() for v in x]
    centres = order[:k].tolist()
    groups = {}
    for i in range(len(x)):
        best = max(range(k), key=lambda c: (float(unit[i] @ unit[centres[c]]), -c))
        groups.setdefault(best, []).append(i)
    error = sum(float((x[i] - x[members].mean(dim=0)).pow(2).sum()) for members in groups.values() for i in members)
    return error / float(x.pow(2).sum())


def test_distortion_equals_brute_force():
    x = torch.randn(3, 12, 5, generator=torch.Generator().manual_seed(1))
    order = greedy_order(x, 12)
    for k in (1, 3, 7, 12):
        got = distortion(x, k, order)
        for b in range(3):
            assert got[b].item() == pytest.approx(brute_distortion(x[b], order[b], k), rel=1e-9, abs=1e-12)
    assert distortion(x, 12, order).abs().max() < 1e-12  # every token its own group


@pytest.mark.parametrize("eps", [0.3, 0.05, 0.001])
def test_distortion_keep_is_karls_smallest_k(eps):
    x = torch.cat([clustered(8), torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(2))])
    order = greedy_order(x, 16)
    got = distortion_keep(x, eps)
    for b in range(len(x)):
        curve = [brute_distortion(x[b], order[b], k) for k in range(1, 17)]
        k = round(got[b].item() * 16)
        assert curve[k - 1] <= eps and (k == 1 or curve[k - 2] > eps)
        if all(a >= c for a, c in zip(curve, curve[1:])):  # a non-increasing curve: bisection = the scan
            assert k == 1 + next(i for i, d in enumerate(curve) if d <= eps)
    if eps >= 0.05:  # above the within-cluster noise: more clusters, more tokens
        assert got[:8].tolist() == sorted(got[:8].tolist())


def test_cls_outliers_equal_the_interquartile_rule_by_hand():
    tokens = torch.randn(4, 1 + 20, 6, generator=torch.Generator().manual_seed(3)).double()
    tokens[0, 3] = tokens[0, 0] * 4  # one patch aligned with the class token: an outlier
    got = cls_outliers(tokens)
    for b in range(4):
        logits = [float(tokens[b, 0] @ tokens[b, j]) / math.sqrt(6) for j in range(1, 21)]
        weights = [math.exp(v - max(logits)) for v in logits]
        attention = [w / sum(weights) for w in weights]
        ordered = sorted(attention)

        def quantile(q):
            position = q * (len(ordered) - 1)
            low = math.floor(position)
            return ordered[low] + (position - low) * (ordered[min(low + 1, len(ordered) - 1)] - ordered[low])

        cut = quantile(0.75) + 1.5 * (quantile(0.75) - quantile(0.25))
        assert got[b].item() == pytest.approx(sum(a > cut for a in attention) / 20)
    assert got[0] >= 1 / 20


def test_jpeg_grows_with_detail_and_ignores_the_input_scale():
    generator = torch.Generator().manual_seed(0)
    flat = torch.zeros(1, 3, 32, 32)
    ramp = torch.linspace(0, 1, 32).expand(1, 3, 32, 32)
    noise = torch.rand(1, 3, 32, 32, generator=generator)
    values = jpeg_bytes_per_pixel(torch.cat([flat, ramp, noise]))
    assert values[0] < values[1] < values[2]
    assert torch.equal(jpeg_bytes_per_pixel(noise * 7 - 3), values[2:])  # min-max scaled per image


# the budget -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [dict(mean_keep=0.25), dict(mean_keep=0.4, min_keep=0.1),
                                      dict(mean_keep=0.8, max_keep=0.9), dict(mean_keep=0.5, min_keep=0.5)])
def test_calibration_mean_equals_the_target(settings):
    calibration = clustered(24)
    budget = Budget.fit("distortion", calibration, eps=0.05, **settings)
    keeps = budget.keeps(calibration)
    assert sum(keeps) / len(keeps) == pytest.approx(settings["mean_keep"], abs=1e-9)
    assert min(keeps) >= budget.min_keep - 1e-12 and max(keeps) <= budget.max_keep + 1e-12
    assert len(set(keeps)) > 1 or settings.get("min_keep") == settings["mean_keep"]


def test_buckets_hit_the_target_as_closely_as_the_tiers_allow():
    calibration = clustered(24)
    tiers = (0.125, 0.25, 0.5)
    budget = Budget.fit("distortion", calibration, mean_keep=0.3, eps=0.05, buckets=tiers)
    keeps = budget.keeps(calibration)
    assert set(keeps) <= set(tiers) and len(set(keeps)) == 3
    # moving one image to a neighbouring tier changes the mean by at most (largest gap) / n
    assert abs(sum(keeps) / 24 - 0.3) <= 0.25 / 24


@pytest.mark.parametrize("buckets", [None, (0.1, 0.3, 0.6, 0.9)])
def test_keep_is_monotone_in_the_signal(buckets):
    budget = Budget.fit("distortion", clustered(24), mean_keep=0.35, eps=0.05, buckets=buckets)
    scores = torch.linspace(-1.0, 2.0, 301, dtype=torch.float64)  # below, inside and above the calibration range
    keeps = budget.keep_for(scores)
    assert all(a <= b for a, b in zip(keeps, keeps[1:]))
    assert keeps[0] < keeps[-1]


def test_kept_counts_resolve_a_keep_per_image():
    x = clustered(8)
    assert kept_counts(0.25, x) == [4] * 8 and kept_counts(5, x, num_protected=1) == [5] * 8
    budget = Budget.fit("distortion", x, mean_keep=0.3, eps=0.05)
    assert kept_counts(budget, x) == [max(1, round(k * 16)) for k in budget.keeps(x)]
    assert len(set(kept_counts(budget, x))) > 1


def test_a_budget_is_saved_and_loaded_as_json(tmp_path):
    budget = Budget.fit("distortion", clustered(12), mean_keep=0.3, eps=0.05, buckets=(0.2, 0.4))
    reducers = (tokred.ToMe(r=2), tokred.DivPrune(keep=budget), tokred.DART(keep=budget, layer=2))
    tokred.save_reducers(tmp_path / "r.json", *reducers)
    assert tokred.load_reducers(tmp_path / "r.json") == reducers
    with pytest.raises(ValueError, match="no spec form.*save_reducers"):
        registry.to_spec(reducers[1])
    assert str(reducers[1]) == repr(reducers[1])  # str() never raises: the repr when there is no spec
    assert "Budget('distortion', mean_keep=0.3, 12 calibration values" in str(reducers[1])


@pytest.mark.parametrize("call,match", [
    (lambda x: Budget.fit("entropy", x), "unknown budget signal"),
    (lambda x: Budget.fit("distortion", x, mean_keep=0.0), "mean_keep must be"),
    (lambda x: Budget.fit("distortion", x, mean_keep=0.3, min_keep=0.5), "keep bounds"),
    (lambda x: Budget.fit("distortion", x, mean_keep=0.3, max_keep=0.2), "keep bounds"),
    (lambda x: Budget.fit("distortion", x, buckets=(0.5, 0.25)), "buckets must be"),
    (lambda x: Budget.fit("distortion", x, mean_keep=0.9, buckets=(0.25, 0.5)), "buckets must be"),
    (lambda x: Budget.fit("distortion", []), "needs calibration data"),
    (lambda x: Budget.fit("dtome_count", x), "constant.*DToMe"),
    (lambda x: Budget.fit("cls_iqr", x), "needs a class token"),
    (lambda x: Budget.fit("jpeg", x), r"reads images \(B, 3, H, W\)"),
    (lambda x: Budget.fit("distortion", x[:, :, 0]), r"reads tokens \(B, N, C\)"),
    (lambda x: Budget("distortion", 0.3, (1.0, 0.5), 0.6), "sorted"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(clustered(6))


# reducers driven by a budget -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llava():
    return tiny_llava("llava")


def projector_features(model, inputs):
    """Each image's projected visual tokens (B, 16, C): what a projector-stage reducer sees."""
    tokred.remove(model)
    with torch.no_grad():
        return torch.stack(model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                          return_dict=True).pooler_output)


class SeenFastV(tokred.FastV):
    seen = []

    def keep_mask(self, signal):
        SeenFastV.seen.append(torch.stack([signal.hidden[b, signal.visual[b]] for b in range(len(signal.hidden))]))
        return super().keep_mask(signal)


def llm_hidden(model, inputs, layer):
    """Each sample's visual hidden states entering decoder layer ``layer``: what an llm-stage reducer sees."""
    SeenFastV.seen = []
    with torch.no_grad(), tokred.applied(model, SeenFastV(keep=0.99, layer=layer)):
        model(**inputs)
    return SeenFastV.seen[0]


def calibration_inputs(model, seed):
    return llava_inputs(model, PROMPTS * 3, seed=seed)


@pytest.fixture(scope="module")
def reducers(llava):
    """A budget per stage, fitted on other images than the test's (the tokens the reducer sees)."""
    features = projector_features(llava, calibration_inputs(llava, 10))
    hidden = llm_hidden(llava, calibration_inputs(llava, 10), 2)
    projector = Budget.fit("distortion", features, mean_keep=0.5, eps=0.2)
    llm = Budget.fit("distortion", hidden, mean_keep=0.5, eps=0.1)
    return {"divprune": tokred.DivPrune(keep=projector), "random": tokred.Random(keep=projector, stage="projector"),
            "fastv": tokred.FastV(keep=llm, layer=2), "dart": tokred.DART(keep=llm, layer=2, image_pivots=2,
                                                                           text_pivots=2),
            "adjacent": tokred.AdjacentMerge(keep=llm, layer=2)}


@pytest.mark.parametrize("name", ["divprune", "random", "fastv", "dart", "adjacent"])
@torch.no_grad()
def test_per_image_counts_follow_the_budget(llava, reducers, name):
    reducer = reducers[name]
    inputs = llava_inputs(llava, PROMPTS, seed=3)
    seen = (projector_features(llava, inputs) if reducer.stage == "projector" else llm_hidden(llava, inputs, 2))
    counts = kept_counts(reducer.keep, seen)
    assert len(set(counts)) > 1  # the test images differ in their budgets
    with tokred.applied(llava, reducer):
        llava(**inputs)
        trace = tokred.last_trace(llava)
    if reducer.stage == "projector":
        assert trace.layers[[r.stage for r in trace.layers].index("projector")].tokens_per_image == counts
    else:
        text = (inputs["attention_mask"].sum(dim=1) - 16).tolist()
        record = next(r for r in trace.layers if r.stage == "llm" and r.layer == 2)
        assert record.tokens_per_image == [t + c for t, c in zip(text, counts)]


@torch.no_grad()
def test_divprune_with_a_budget_keeps_each_image_its_fixed_count_selection(llava, reducers):
    """The greedy order is nested: an image keeping k_i under a budget keeps DivPrune(keep=k_i)'s tokens."""
    reducer = reducers["divprune"]
    inputs = llava_inputs(llava, PROMPTS, seed=3)
    counts = kept_counts(reducer.keep, projector_features(llava, inputs))
    with tokred.applied(llava, reducer):
        logits = llava(**inputs).logits[:, -1]
    for i, count in enumerate(counts):
        single = llava_inputs(llava, [PROMPTS[i]], seed=3)
        single["pixel_values"] = inputs["pixel_values"][i:i + 1]
        with tokred.applied(llava, tokred.DivPrune(keep=count)):
            torch.testing.assert_close(llava(**single).logits[:, -1], logits[i:i + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["divprune", "fastv", "dart", "adjacent"])
@torch.no_grad()
def test_batch_equals_one_by_one_and_cached_equals_uncached(llava, reducers, name):
    reducer = reducers[name]
    batch = llava_inputs(llava, PROMPTS, seed=3)
    singles = [llava_inputs(llava, [prompt], seed=3) for prompt in PROMPTS]
    with tokred.applied(llava, reducer):
        logits = llava(**batch).logits[:, -1]
        tokens = greedy_cached(llava, batch, 3)
        assert torch.equal(tokens, greedy_uncached(llava, batch, 3))
        for i, single in enumerate(singles):
            single["pixel_values"] = batch["pixel_values"][i:i + 1]
            torch.testing.assert_close(llava(**single).logits[:, -1], logits[i:i + 1], atol=1e-5, rtol=1e-5)
            assert torch.equal(greedy_cached(llava, single, 3), tokens[i:i + 1])


@pytest.mark.parametrize("name", ["divprune", "random", "fastv", "dart"])
@torch.no_grad()
def test_a_budget_keeping_everything_is_the_unpatched_model(llava, name):
    everything = Budget.fit("distortion", clustered(8, dim=64), mean_keep=1.0, eps=0.05)
    reducer = {"divprune": tokred.DivPrune(keep=everything), "random": tokred.Random(keep=everything, stage="projector"),
               "fastv": tokred.FastV(keep=everything), "dart": tokred.DART(keep=everything)}[name]
    inputs = llava_inputs(llava, PROMPTS)
    reference = llava(**inputs).logits
    with tokred.applied(llava, reducer):
        assert torch.equal(llava(**inputs).logits, reference)


def vision_images(n, seed):
    images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    images[::2, :, :8, :8] += 4  # a bright corner on every other image
    return images


@torch.no_grad()
def test_random_at_the_vision_stage_with_a_class_token_budget():
    model = tiny_vit()
    entering = lambda images: model.blocks[0](model._pos_embed(model.patch_embed(images)))  # noqa: E731
    budget = Budget.fit("cls_iqr", entering(vision_images(12, 5)), mean_keep=0.3, num_protected=1)
    images = vision_images(4, 6)
    counts = kept_counts(budget, entering(images), num_protected=1)
    assert len(set(counts)) > 1
    with tokred.applied(model, tokred.Random(keep=budget, layer=1)):
        model(images)
        trace = tokred.last_trace(model)
    assert trace.layers[1].tokens_per_image == [1 + c for c in counts] and trace.tokens()[1] == 1 + max(counts)
    assert not trace.notes


def test_a_signal_the_stage_cannot_measure_is_refused(llava):
    budget = Budget.fit("cls_iqr", torch.randn(6, 17, 32, generator=torch.Generator().manual_seed(0)), mean_keep=0.3,
                        num_protected=1)
    inputs = llava_inputs(llava, PROMPTS)
    with tokred.applied(llava, tokred.DivPrune(keep=budget)), pytest.raises(ValueError, match="needs a class token"):
        llava(**inputs)
