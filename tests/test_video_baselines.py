"""The video baselines' rules against brute-force versions written token by token: VisionZip per
frame, DyCoke's TTM, uniform and random per-frame keep, Pool's temporal stride; their specs and
bad settings. (In models: tests/test_llava.py and tests/test_qwen2_vl.py, ``onevision_video`` /
``videos`` cases; tests/test_video.py.)"""
import math

import pytest
import torch
import torch.nn.functional as F

import tokred
from tokred.reducers.baselines import grid_pooling
from tokred.reducers.video import dycoke_ttm, uniform_keep, visionzip_frame
from tokred.signals import Layout


def brute_force_visionzip(x, received, dominant, contextual):
    """VisionZip on one frame, token by token: the output tokens (in index order) and their groups."""
    n = x.shape[0]
    ranked = sorted(range(n), key=lambda i: (-received[i].item(), i))
    kept_dominant = sorted(ranked[:dominant])
    rest = [i for i in range(n) if i not in kept_dominant]
    groups = {i: [i] for i in kept_dominant}
    if contextual:
        step = max(1, len(rest) // contextual)
        targets = [rest[r] for r in range(0, len(rest), step)][:contextual]
        for t in targets:
            groups[t] = [t]
        for i in rest:
            if i in targets:
                continue
            sims = [F.cosine_similarity(x[i], x[t], dim=0).item() for t in targets]
            groups[targets[sims.index(max(sims))]].append(i)
    order = sorted(groups)
    return torch.stack([x[groups[o]].mean(dim=0) for o in order]), [sorted(groups[o]) for o in order]


@pytest.mark.parametrize("n,dominant,contextual", [(16, 4, 2), (16, 0, 3), (12, 5, 0), (9, 2, 7), (16, 10, 6)])
def test_visionzip_frame_equals_brute_force(n, dominant, contextual):
    torch.manual_seed(n + dominant)
    x = torch.randn(3, n, 6, dtype=torch.float64)
    received = torch.rand(3, n).round(decimals=1)  # ties in the attention: the lower index wins
    plan = visionzip_frame(x, received, dominant, contextual)
    merged, size = plan.weighted_mean(x, torch.ones(3, n, 1, dtype=torch.float64))
    assert plan.num_outputs == dominant + contextual
    for b in range(3):
        want, groups = brute_force_visionzip(x[b], received[b], dominant, contextual)
        torch.testing.assert_close(merged[b], want)
        assert size[b, :, 0].tolist() == [len(g) for g in groups]


def test_visionzip_plan_is_laid_out_frame_by_frame():
    torch.manual_seed(0)
    x, received = torch.randn(2, 3 * 16, 8, dtype=torch.float64), torch.rand(2, 3 * 16)
    plan = tokred.VisionZip(dominant=3, contextual=2).plan_images(x, Layout(3, 4, 4), received=received)
    merged, size = plan.weighted_mean(x, torch.ones(2, 48, 1, dtype=torch.float64))
    assert merged.shape == (2, 3 * 5, 8) and size.sum(dim=1).eq(48).all()
    for b in range(2):
        for f in range(3):
            want, _ = brute_force_visionzip(x[b, 16 * f:16 * (f + 1)], received[b, 16 * f:16 * (f + 1)], 3, 2)
            torch.testing.assert_close(merged[b, 5 * f:5 * (f + 1)], want)
    fractions = tokred.VisionZip(dominant=0.25, contextual=0.125).plan_images(x, Layout(3, 4, 4), received=received)
    assert torch.equal(fractions.keep, tokred.VisionZip(dominant=4, contextual=2).plan_images(
        x, Layout(3, 4, 4), received=received).keep)


def brute_force_dycoke(x, frames, keep, window):
    """DyCoke's TTM, frame by frame, with plain loops: the kept token indices."""
    n = x.shape[0] // frames
    kept = []
    for f in range(frames):
        if f % window == 0:
            kept += range(f * n, (f + 1) * n)
            continue
        reference = f - 1 if (f % window) % 2 else f - 2
        sims = [(F.normalize(x[f * n + i], dim=0) * F.normalize(x[reference * n + i], dim=0)).sum().item()
                for i in range(n)]
        least = sorted(range(n), key=lambda i: (sims[i], i))[:math.floor(keep * n)]
        kept += [f * n + i for i in least]
    return sorted(kept)


@pytest.mark.parametrize("frames,keep,window", [(8, 0.3, 4), (7, 0.3, 4), (5, 0.5, 2), (6, 0.0, 4), (4, 1.0, 4),
                                                (9, 0.25, 3)])
def test_dycoke_equals_brute_force(frames, keep, window):
    torch.manual_seed(frames)
    n = 16
    x = torch.randn(2, frames * n, 5, dtype=torch.float64)
    x[:, 3 * n:4 * n] = x[:, 2 * n:3 * n]  # a repeated frame: every similarity 1, ties to the lower index
    got = dycoke_ttm(x, frames, keep, window)
    for b in range(2):
        assert got[b].tolist() == brute_force_dycoke(x[b], frames, keep, window)
    first_frames = len(range(0, frames, window))
    assert got.shape[1] == first_frames * n + (frames - first_frames) * math.floor(keep * n)


def test_dycoke_keeps_the_least_similar_tokens():
    """Frame 1 differs from frame 0 at two positions only: exactly those survive with keep = 2/16."""
    x = torch.randn(1, 1, 16, 8).expand(1, 2, 16, 8).clone()
    x[0, 1, [3, 11]] = torch.randn(2, 8)
    plan = tokred.DyCoke(keep=0.125).plan_images(x.view(1, 32, 8), Layout(2, 4, 4))
    assert plan.keep[0].tolist() == list(range(16)) + [16 + 3, 16 + 11]


def test_uniform_keep_is_evenly_spaced_in_every_frame():
    plan = uniform_keep(frames=2, n=16, k=5, batch=3)
    assert plan.keep.tolist() == [[0, 3, 6, 9, 12, 16, 19, 22, 25, 28]] * 3
    assert tokred.Uniform(keep=1.0).plan_images(torch.zeros(1, 32, 2), Layout(2, 4, 4)).keep[0].tolist() == \
        list(range(32))
    assert tokred.Uniform(keep=0.25).plan_images(torch.zeros(1, 10, 2), None).keep[0].tolist() == [0, 5]


def test_random_per_frame_keeps_the_count_in_every_frame():
    reducer = tokred.Random(keep=3, stage="projector", per_frame=True, seed=5)
    plan = reducer.plan_images(torch.zeros(4, 5 * 16, 2), Layout(5, 4, 4))
    frame_of = plan.keep // 16
    assert plan.keep.shape == (4, 15) and all(torch.equal(row, row.sort().values) for row in plan.keep)
    assert all(frame_of[b].bincount(minlength=5).eq(3).all() for b in range(4))
    assert len({tuple(row) for row in plan.keep.tolist()}) > 1  # items and frames draw independently
    assert torch.equal(reducer.plan_images(torch.zeros(4, 80, 2), Layout(5, 4, 4)).keep, plan.keep)  # seeded


@pytest.mark.parametrize("grid,stride", [((4, 4, 4), (2, 2, 2)), ((5, 3, 5), (2, 2, 3)), ((3, 4, 4), (1, 2, 2)),
                                         ((7, 2, 2), (3, 1, 1))])
def test_temporal_pooling_equals_avg_pool3d(grid, stride):
    torch.manual_seed(0)
    x = torch.randn(2, math.prod(grid), 5, dtype=torch.float64)
    plan = grid_pooling(grid, stride, batch=2)
    pooled, size = plan.weighted_mean(x, torch.ones(2, x.shape[1], 1, dtype=torch.float64))
    video = x.transpose(1, 2).reshape(2, 5, *grid)
    want = F.avg_pool3d(video, stride, stride, ceil_mode=True).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pooled, want)
    reducer = tokred.Pool(stride=stride[1:], stage="projector", temporal_stride=stride[0])
    assert torch.equal(reducer.plan_images(x, Layout(*grid)).keep, plan.keep)


def test_specs_round_trip():
    for reducer in (tokred.VisionZip(dominant=4, contextual=2), tokred.VisionZip(dominant=0.2, contextual=0),
                    tokred.DyCoke(keep=0.3, window=2), tokred.Uniform(keep=5),
                    tokred.Random(keep=0.25, stage="projector", per_frame=True),
                    tokred.Pool(stride=2, stage="projector", temporal_stride=2)):
        assert tokred.parse_spec(str(reducer)) == (reducer,)
    assert str(tokred.reducer("dycoke")) == "dycoke" and tokred.reducer("visionzip") == tokred.VisionZip()


@pytest.mark.parametrize("make,message", [
    (lambda: tokred.VisionZip(dominant=-1), "dominant"),
    (lambda: tokred.VisionZip(dominant=0, contextual=0), "every token"),
    (lambda: tokred.VisionZip(contextual=1.5), "contextual"),
    (lambda: tokred.DyCoke(keep=1.2), "keep"),
    (lambda: tokred.DyCoke(keep=1), "float"),
    (lambda: tokred.DyCoke(window=0), "window"),
    (lambda: tokred.Uniform(keep=0), "keep"),
    (lambda: tokred.Random(keep=0.5, per_frame=True), "projector"),
    (lambda: tokred.Pool(temporal_stride=2), "projector"),
    (lambda: tokred.Pool(stage="projector", temporal_stride=0), "temporal_stride"),
])
def test_bad_settings(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_sizes_at_plan_time():
    x, received = torch.zeros(1, 32, 4), torch.zeros(1, 32)
    with pytest.raises(ValueError, match="a frame has 16"):
        tokred.VisionZip(dominant=12, contextual=5).plan_images(x, Layout(2, 4, 4), received=received)
    with pytest.raises(ValueError, match="tower"):
        tokred.VisionZip(dominant=2, contextual=1).plan_images(x, Layout(2, 4, 4))
    with pytest.raises(ValueError, match="only 16"):
        tokred.Uniform(keep=17).plan_images(x, Layout(2, 4, 4))
    with pytest.raises(ValueError, match="non-finite"):
        tokred.VisionZip(dominant=2, contextual=1).plan_images(x, Layout(2, 4, 4), received=received / 0)
