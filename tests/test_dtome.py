"""DToMe (DyMU's dynamic merging) and its calibration: the rule against a brute-force version,
ToMe's order, identities, batch == one by one, the calibration statistic, and the calibrated
average token count on the digits reference model."""
import math

import pytest
import torch

import tokred
from helpers import tiny_vit
from tokred.reducers.dtome import (DToMe, _BatchLevelMerging, batch_merge_statistic, best_matches, calibrate_dtome,
                                   dtome_plan)
from tokred.reducers.tome import bipartite_soft_matching
from tokred.schedule import dymu_schedule
from tokred.signals import Signal


def brute_force_dtome(metric, x, size, threshold, protected):
    """DToMe's rule for one image written out token by token (live tokens = size > 0, in order): the
    A tokens above the threshold merge, at most (live - protected) // 2 of them, the best first."""
    live = [t for t in range(metric.shape[0]) if size[t] > 0]
    cos = torch.nn.functional.cosine_similarity
    a = [t for rank, t in enumerate(live) if rank >= protected and rank % 2 == 0]
    b = [t for rank, t in enumerate(live) if rank >= protected and rank % 2 == 1]
    best = {}
    for i in a if b else []:
        scores = [min(max(cos(metric[i].double(), metric[j].double(), dim=0).item(), -1.0), 1.0) for j in b]
        best[i] = (max(scores), b[scores.index(max(scores))])
    ranked = sorted(best, key=lambda i: (-best[i][0], i))  # descending score, ties to the lower position
    merged = {i: best[i][1] for i in ranked[:(len(live) - protected) // 2] if best[i][0] > threshold}
    unmerged = [i for i in (a if protected else ranked) if i not in merged]  # by position after a class token
    order = live[:protected] + unmerged + b if merged else live  # no merge: no reorder
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


@pytest.mark.parametrize("protected,n", [(1, 17), (0, 17), (0, 16)])
def test_minus_infinity_is_tome_at_its_largest_r(protected, n):
    """Every A token merges, up to ToMe's cap ((N - protected) // 2: |A| - 1 for odd N and no class
    token), with ToMe's output order."""
    metric = torch.randn(2, n, 6, generator=torch.Generator().manual_seed(3))
    dtome = dtome_plan(metric, -math.inf, protected)
    tome = bipartite_soft_matching(metric, r=100, num_protected=protected)
    assert torch.equal(dtome.keep, tome.keep)
    x, size = torch.randn(2, n, 3), torch.ones(2, n, 1)
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


@pytest.mark.parametrize("protected", [0, 1])
def test_without_a_class_token_unmerged_a_stay_in_descending_score_order(protected):
    # A = 0, 2, 4 (2, 4 after a class token); B = 1, 3, 5. Best: 4 -> 1 (cos 1), 2 -> 1 (0.71), 0 -> 5 (0.55)
    metric = torch.tensor([[[-1.0, -1.5], [1, 0], [1, 1], [0, 1], [1, 0], [-1, 0]]])
    plan = dtome_plan(metric, 0.9, protected)
    assert plan.src.tolist() == [[4]]
    assert plan.keep.tolist() == ([[2, 0, 1, 3, 5]] if not protected else [[0, 2, 1, 3, 5]])


def test_calibration_lays_out_an_image_that_merges_nothing_like_the_others():
    """Batch-level merging lays out every image as [class, unmerged A, B], also one whose edges all
    fell below the batch's top r * B (the reference reorders the whole batch at once)."""
    metric = torch.tensor([[[1., 0, 0], [0, 1, 0], [0, 1, 0], [1, 1, 0], [1, 1, 0]],  # its 2 edges: cos 1
                           [[1., 0, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0], [-1, -1, 0.1]]])  # best 0 and -0.7
    calibration = _BatchLevelMerging(1, "constant", prop_attn=True)
    calibration.check(1)
    plan = calibration.plan(0, 1, Signal(metric, metric, 1, None))
    assert plan.src.tolist() == [[2, 4], [5, 5]]  # r * B = 2 edges, both in image 0 (5: padding)
    assert plan.keep.tolist() == [[0, 1, 3, 5, 5], [0, 2, 4, 1, 3]]


@pytest.mark.parametrize("schedule,expected", [("constant", [6, 6, 6, 6]), ("linear", [12, 9, 3, 0]),
                                               ("reverse_linear", [0, 3, 9, 12])])
def test_dymu_schedules(schedule, expected):
    """DyMU's schedules of r * L = 24 tokens over 4 blocks: r0 = 2 * 24 // 4 = 12 falling by 12 / 4 = 3 per
    block (12, 9, then 6 would pass 24: the remainder 3, then 0), and that reversed."""
    calibration = _BatchLevelMerging(6, schedule, prop_attn=True)
    calibration.check(4)
    assert calibration.schedule == expected
    assert dymu_schedule(5, 3) == [10, 5, 0]  # 10, floor(10 - 10/3) = 6 passes 15: the remainder 5


def test_a_linear_schedule_that_cannot_reach_r_times_l_is_refused(images):
    """r = 1 over 24 blocks: r0 = 2 falls by 1/12, floor(2 - k/12) = 2, 1 (x 12), then 0: 14 of the 24 tokens."""
    with pytest.raises(ValueError, match="removes only 14 of the r \\* L = 24 tokens"):
        dymu_schedule(1, 24)
    model = tiny_vit(depth=24)
    with pytest.raises(ValueError, match="linear schedule with r=1 over 24 layers"):
        calibrate_dtome(model, [images], r=1, schedule="linear", progress=False)
    assert tokred.reducers_of(model) == ()
    with pytest.raises(ValueError, match="already gives one r per block"):
        calibrate_dtome(model, [images], r=[1, 2], schedule="linear", progress=False)


def test_batch_merge_statistic():
    inf = math.inf
    # class token + 4 patches: the A rows are the even positions 0 (class, -inf), 2, 4: B * 3 = 6 rows, 4 real edges
    best = torch.tensor([[-inf, -inf, 0.9, -inf, 0.5], [-inf, -inf, 0.95, -inf, 0.7]])
    merged, statistic = batch_merge_statistic(best, r=1)  # r * B = 2 edges merge
    assert merged.tolist() == [[False, False, True, False, False], [False, False, True, False, False]]
    assert statistic == pytest.approx(0.7)  # the largest score not merged
    for r in (2, 5):  # every real edge merges: the row at rank min(r * B, 5) is a class row, -inf, clamped to 0
        merged, statistic = batch_merge_statistic(best, r=r)
        assert merged.tolist() == torch.isfinite(best).tolist() and statistic == 0.0
    # no class token, no padding: every row is a real edge; rank min(r * B, rows - 1) is the last one
    best = torch.tensor([[0.9, -inf, 0.3, -inf], [0.8, -inf, 0.6, -inf]])
    assert batch_merge_statistic(best, r=2)[1] == pytest.approx(0.3)
    assert batch_merge_statistic(best, r=1)[1] == pytest.approx(0.6)
    assert batch_merge_statistic(best - 2, r=1)[1] == 0.0  # clamped at 0


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
