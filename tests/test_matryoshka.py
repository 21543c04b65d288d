"""Matryoshka (M3's nested pooling scales at the projector): the alias of Pool it is, its scales
and its refusals."""
import pytest
import torch

import tokred
from helpers import llava_inputs, tiny_llava
from tokred.signals import Layout


def test_pools_square_windows_row_major():
    features = torch.arange(16.0).view(1, 16, 1)  # a 4 x 4 grid holding its own index
    plan = tokred.Matryoshka(tokens=4).plan_images(features, Layout(1, 4, 4))
    pooled, size = plan.weighted_mean(features, torch.ones(1, 16, 1))
    assert pooled[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5] and size[0, :, 0].tolist() == [4.0] * 4
    everything = tokred.Matryoshka(tokens=16).plan_images(features, Layout(1, 4, 4))
    assert torch.equal(everything.weighted_mean(features, torch.ones(1, 16, 1))[0], features)


@torch.no_grad()
def test_equals_pool_at_the_projector():
    model = tiny_llava("llava")  # 4 x 4 visual tokens per image
    inputs = llava_inputs(model, [([1, 2], [3, 4])])
    with tokred.applied(model, tokred.Pool(stride=2, stage="projector")):
        expected = model(**inputs).logits
    with tokred.applied(model, tokred.Matryoshka(tokens=4)):
        assert torch.equal(model(**inputs).logits, expected)
        assert tokred.last_trace(model).tokens("projector") == [4]


@pytest.mark.parametrize("tokens", [0, 5, 2.0, True])
def test_tokens_must_be_a_perfect_square(tokens):
    with pytest.raises(ValueError, match="perfect square"):
        tokred.Matryoshka(tokens=tokens)


def test_a_scale_that_does_not_divide_the_grid_names_the_scales():
    with pytest.raises(ValueError, match=r"square divisors \[16, 4, 1\]"):
        tokred.Matryoshka(tokens=9).plan_images(torch.zeros(1, 16, 2), Layout(1, 4, 4))
    with pytest.raises(ValueError, match="full square grid"):
        tokred.Matryoshka(tokens=4).plan_images(torch.zeros(1, 16, 2), None)
