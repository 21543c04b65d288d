"""DToMe (DyMU's dynamic merging) and its calibration: the rule against a brute-force version,
ToMe's order, identities, batch == one by one, the calibration statistic, and the calibrated
average token count on the digits reference model."""
import math

import pytest
import torch

import tokred
from helpers import tiny_vit
from tokred.reducers.dtome import DToMe, batch_merge_statistic, best_matches, calibrate_dtome, dtome_plan
from tokred.reducers.tome import bipartite_soft_matching


def brute_force_dtome(metric, x, size, threshold, protected):
    """DToMe's rule for one image written out token by token (live tokens = size > 0, in order)."""
    live = [t for t in range(metric.shape[0]) if size[t] > 0]
    cos = torch.nn.functional.cosine_similarity
    a = [t for rank, t in enumerate(live) if rank >= protected and rank % 2 == 0]
    b = [t for rank, t in enumerate(live) if rank >= protected and rank % 2 == 1]
    merged = {}
    for i in a:
        if not b:
            break
        scores = [min(max(cos(metric[i].double(), metric[j].double(), dim=0).item(), -1.0), 1.0) for j in b]
        best = max(scores)
        if best > threshold:
            merged[i] = b[scores.index(best)]
    order = live[:protected] + [i for i in a if i not in merged] + b if merged else live  # no merge: no reorder
    groups = [[t] + [s for s, d in merged.items() if d == t] for t in order]
    out_x = torch.stack([sum(x[t] * size[t] for t in g) / sum(size[t] for t in g) for g in groups])
    out_size = torch.stack([sum(size[t] for t in g) for g in groups])
    return out_x, out_size


@pytest.mark.parametrize("threshold", [-math.inf, 0.0, 0.3, 0.8, 2.0])
@pytest.mark.parametrize("protected", [0, 1])
def test_rule_equals_brute_force(threshold, protected):
    generator = torch.Generator().manual_seed(7)
    metric = torch.randn(3, 13, 4, generator=generator, dtype=torch.float64)
    metric[1, 5] = metric[1, 2]  # an exact duplicate: merges at every threshold below 1
    x = torch.randn(3, 13, 5, generator=generator, dtype=torch.float64)
    size = torch.ones(3, 13, 1, dtype=torch.float64)
    size[2, 9:] = 0  # the last image is padding from token 9 on
    size[0, 3] = 2.5
    plan = dtome_plan(metric, threshold, protected, size)
    out_x, out_size = plan.weighted_mean(x, size)
    for image in range(3):
        want_x, want_size = brute_force_dtome(metric[image], x[image], size[image], threshold, protected)
        count = want_x.shape[0]
        torch.testing.assert_close(out_x[image, :count], want_x)
        torch.testing.assert_close(out_size[image, :count], want_size)
        assert bool((out_size[image, count:] == 0).all())  # padding after the image's own tokens


def test_minus_infinity_is_tome_at_its_largest_r():
    metric = torch.randn(2, 17, 6, generator=torch.Generator().manual_seed(3))
    dtome = dtome_plan(metric, -math.inf, 1)
    tome = bipartite_soft_matching(metric, r=100, num_protected=1)
    assert torch.equal(dtome.keep, tome.keep)
    x, size = torch.randn(2, 17, 3), torch.ones(2, 17, 1)
    torch.testing.assert_close(dtome.weighted_mean(x, size)[0], tome.weighted_mean(x, size)[0])


def test_cosines_are_clamped_so_one_never_merges():
    metric = torch.ones(1, 6, 3)  # every cosine is 1 (up to rounding)
    alive, _, best, _ = best_matches(metric, 0)
    assert float(best[alive].max()) <= 1.0
    assert dtome_plan(metric, 1.0, 0).num_outputs == 6
    assert dtome_plan(metric, 0.99, 0).num_outputs == 3


@torch.no_grad()
def test_threshold_above_one_is_the_unpatched_model(images):
    model = tiny_vit()
    reference = model(images)
    with tokred.applied(model, DToMe(thresholds=1.5)):
        assert torch.equal(model(images), reference)


@torch.no_grad()
def test_batch_equals_images_alone_and_counts_vary():
    model = tiny_vit()
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    flat = torch.full((1, 3, 32, 32), 0.2)
    batch = torch.cat([noise, flat])
    reducer = DToMe(thresholds=(0.9, 0.8, 0.7, 0.6))
    with tokred.applied(model, reducer):
        out = model(batch)
        counts = tokred.last_trace(model).layers[-1].tokens_per_image
        alone, alone_counts = [], []
        for image in (noise, flat):
            alone.append(model(image))
            alone_counts.append(tokred.last_trace(model).tokens())
    assert counts is not None and counts[0] != counts[1]
    assert [alone_counts[0][-1], alone_counts[1][-1]] == counts
    assert alone_counts[0][0] == 65  # the noise image merges nothing in block 0, the flat one does
    for i, single in enumerate(alone):
        torch.testing.assert_close(out[i:i + 1], single, atol=1e-5, rtol=1e-5)


def test_an_image_that_merges_nothing_keeps_its_order():
    metric = torch.tensor([[[1., 0], [0, 1], [-1, 0], [0, -1]], [[1., 0], [1, 0], [1, 0], [1, 0]]])
    plan = dtome_plan(metric, 0.5, 0)
    assert plan.keep[0].tolist() == [0, 1, 2, 3] and plan.keep[1].tolist() == [1, 3, 4, 4]  # 4: padding


def test_output_order_is_tomes():
    # protected 0; tokens 0..5, A = 0, 2, 4; B = 1, 3, 5. Only token 2 matches (into 5).
    metric = torch.tensor([[[1., 0], [0, 1], [1, 1], [-1, 0], [0, -1], [1, 1.01]]])
    plan = dtome_plan(metric, 0.999, 0)
    assert plan.keep.tolist() == [[0, 4, 1, 3, 5]]  # unmerged A in order, then every B
    assert plan.src.tolist() == [[2]] and plan.dst.tolist() == [[4]]


def test_batch_merge_statistic():
    best = torch.tensor([[0.9, -math.inf, 0.5, 0.2], [0.95, 0.1, -math.inf, 0.7]])
    merged, statistic = batch_merge_statistic(best, r=1)  # r * B = 2 edges of the pooled 6
    assert merged.tolist() == [[True, False, False, False], [True, False, False, False]]
    assert statistic == pytest.approx(0.7)  # the largest score not merged
    merged, statistic = batch_merge_statistic(best, r=5)  # more edges asked than exist: the last one
    assert bool(merged[torch.isfinite(best)].all()) and statistic == pytest.approx(0.1)
    assert batch_merge_statistic(-best.abs() - 1, r=1)[1] == 0.0  # clamped at 0


@pytest.mark.parametrize("bad", [dict(thresholds="a"), dict(thresholds=float("nan")), dict(thresholds=()),
                                 dict(prop_attn=1)])
def test_bad_arguments(bad):
    with pytest.raises((ValueError, TypeError)):
        DToMe(**bad)


def test_wrong_number_of_thresholds_leaves_the_model_untouched(images):
    model = tiny_vit()
    with pytest.raises(ValueError, match="3 DToMe thresholds given for a model with 4 blocks"):
        tokred.apply(model, DToMe(thresholds=(0.5, 0.5, 0.5)))
    assert tokred.reducers_of(model) == ()


def test_spec_round_trip():
    reducer = DToMe(thresholds=(0.5, 0.25, math.inf))
    assert tokred.parse_spec(str(reducer)) == (reducer,)


@torch.no_grad()
def test_calibrated_average_count_on_the_reference_model():
    """DyMU's contract: the average tokens removed per block is about r on held-out images."""
    from tokred.reference import load_reference_data, load_reference_model, load_reference_train_data

    model = load_reference_model()
    train, _ = load_reference_train_data()
    test, _ = load_reference_data()
    r = 3
    dtome = calibrate_dtome(model, train[:512].split(128), r=r, progress=False)
    assert len(dtome.thresholds) == 8 and all(-1 <= t <= 1 for t in dtome.thresholds)
    with tokred.applied(model, dtome):
        counts = []
        for batch in test.split(90):
            model(batch)
            trace = tokred.last_trace(model)
            counts += trace.layers[-1].tokens_per_image or [trace.final_tokens] * batch.shape[0]
    counts = torch.tensor(counts, dtype=torch.float64)
    target = 65 - 8 * r
    assert abs(counts.mean().item() - target) <= 0.1 * target, (counts.mean(), counts.std(), target)
    assert counts.std() > 0  # adaptive: images differ
    assert tokred.reducers_of(model) == ()


def test_calibrated_reducers_save_and_load_as_json(tmp_path):
    import json

    dtome = DToMe(thresholds=(0.1234567890123, 1 / 3, math.inf))
    thresholds = tokred.Thresholds(merge=[0.5, 0.25], prune=-math.inf)
    tokred.save_reducers(tmp_path / "r.json", dtome, thresholds)
    assert json.loads((tmp_path / "r.json").read_text())["spec"].startswith("dtome:")
    assert tokred.load_reducers(tmp_path / "r.json") == (dtome, thresholds)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a tokred reducers file"):
        tokred.load_reducers(tmp_path / "bad.json")
