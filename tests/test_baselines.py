"""Random pruning and grid pooling: their rules, the model-level result, identities, bad input."""
import pytest
import torch
import torch.nn.functional as F

import tokred
from helpers import tiny_vit
from tokred.reducers.baselines import Pool, Random, grid_pooling, random_keep


def test_random_keep_rule():
    generator = torch.Generator().manual_seed(3)
    plan = random_keep(20, 6, batch=4, num_protected=2, generator=generator)
    assert plan.keep.shape == (4, 8) and not plan.merges
    assert plan.keep[:, :2].tolist() == [[0, 1]] * 4
    for row in plan.keep[:, 2:].tolist():
        assert row == sorted(set(row)) and min(row) >= 2 and max(row) < 20
    assert len({tuple(row) for row in plan.keep.tolist()}) > 1  # images draw independently
    again = random_keep(20, 6, batch=4, num_protected=2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.keep, plan.keep)


@pytest.mark.parametrize("grid,stride", [((4, 4), (2, 2)), ((5, 7), (2, 3)), ((6, 6), (3, 3)), ((3, 5), (1, 2))])
def test_grid_pooling_equals_avg_pool2d(grid, stride):
    torch.manual_seed(0)
    rows, cols = grid
    x = torch.randn(2, 1 + rows * cols, 5, dtype=torch.float64)
    plan = grid_pooling(grid, stride, batch=2, num_protected=1)
    pooled, size = plan.weighted_mean(x, torch.ones(2, x.shape[1], 1, dtype=torch.float64))
    image = x[:, 1:].transpose(1, 2).reshape(2, 5, rows, cols)
    want = F.avg_pool2d(image, stride, stride, ceil_mode=True).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pooled[:, 1:], want)
    torch.testing.assert_close(pooled[:, 0], x[:, 0])
    assert size.sum(1).eq(x.shape[1]).all()


def _blocks_on(model, tokens):
    for block in model.blocks:
        tokens = block(tokens)
    return model.forward_head(model.norm(tokens))


def test_pool_in_a_model_equals_pooling_then_the_plain_model(images):
    model = tiny_vit(reg_tokens=1)
    with torch.no_grad():
        tokens = model._pos_embed(model.patch_embed(images))
        plan = grid_pooling((8, 8), (2, 2), batch=3, num_protected=2)
        want = _blocks_on(model, plan.weighted_mean(tokens, torch.ones(*tokens.shape[:2], 1))[0])
        got = tokred.apply(model, Pool(stride=2))(images)
    torch.testing.assert_close(got, want)
    trace = tokred.last_trace(model)
    assert trace.tokens() == [18] * 4 and trace.sizes[:, 2:].eq(4).all()
    assert trace.layers[0].tokens_in == 66 and trace.layers[0].tokens_attention == 18


def test_random_in_a_model_equals_pruning_then_the_plain_model(images):
    model = tiny_vit()
    with torch.no_grad():
        tokens = model._pos_embed(model.patch_embed(images))
        for block in model.blocks[:2]:
            tokens = block(tokens)
        plan = random_keep(65, 16, batch=3, num_protected=1, generator=torch.Generator().manual_seed(7))
        tokens = plan.select(tokens)
        for block in model.blocks[2:]:
            tokens = block(tokens)
        want = model.forward_head(model.norm(tokens))
        got = tokred.apply(model, Random(keep=0.25, layer=2, seed=7))(images)
    torch.testing.assert_close(got, want)
    assert tokred.last_trace(model).tokens() == [65, 65, 17, 17]


@pytest.mark.parametrize("reducer", [Random(keep=1.0), Pool(stride=1), Random(keep=0.5, layer=3)])
def test_identities(reducer, images):
    model = tiny_vit(init_values=0.1)
    with torch.no_grad():
        want = model(images)
        got = tokred.apply(model, reducer)(images)
    if reducer.layer == 3:  # acts only at the last block: the first three run untouched
        assert tokred.last_trace(model).tokens() == [65, 65, 65, 33]
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("make,match", [
    (lambda: Random(keep=0), "keep"), (lambda: Random(keep=1.2), "keep"), (lambda: Random(layer=-1), "layer"),
    (lambda: Random(seed=1.5), "seed"), (lambda: Pool(stride=0), "stride"), (lambda: Pool(stride=(2, 2, 2)), "stride"),
    (lambda: Pool(layer=True), "layer"), (lambda: Pool(stride=(2,)), r"\(rows, cols\) pair"),
    (lambda: Pool(stride=(2, 0)), "stride"), (lambda: Pool(stride=[2, 2]), "stride"),
    (lambda: Random(seed=2**64), r"\[0, 2\*\*64 - 1\]"), (lambda: Random(seed=-1), "seed"),
])
def test_bad_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_the_largest_seed_runs(images):
    model = tokred.apply(tiny_vit(), Random(keep=0.5, seed=2**64 - 1))
    with torch.no_grad():
        first = model(images)
        assert torch.equal(model(images), first)  # reseeded at every forward
    assert tokred.last_trace(model).tokens() == [33] * 4


@pytest.mark.parametrize("reducer", [Random(layer=4), Pool(layer=9)])
def test_layer_beyond_the_model(reducer, images):
    model = tiny_vit()
    with pytest.raises(ValueError, match="only 4 blocks"):
        tokred.apply(model, reducer)
    assert type(model).__name__ == "VisionTransformer"


def test_random_int_keep_is_a_count(images):
    model = tiny_vit()
    with tokred.applied(model, Random(keep=5)):
        model(images)
        assert tokred.last_trace(model).tokens()[0] == 1 + 5
    with pytest.raises(ValueError, match="keep=65 tokens, but there are only 64"):
        with tokred.applied(model, Random(keep=65)):
            model(images)
