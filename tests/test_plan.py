"""Plans: the merge with per-source weights (``Plan.weight``) and the size-weighted merge against
token-by-token versions, and ``sequence_plan`` carrying the weights to their sources."""
import pytest
import torch

from tokred.plan import Plan, sequence_plan


def brute_force_merge(x, keep, merges, weight=None, size=None):
    """One row: per kept input t (in ``keep`` order) the merge of t and the inputs j with merges[j] == t:
    (1 - sum_j w_j) x_t + sum_j w_j x_j with the given weights, else the size-weighted mean."""
    out = []
    for t in keep:
        sources = [j for j, d in merges.items() if d == t]
        if weight is None:
            total = size[t] + sum(size[j] for j in sources)
            out.append((size[t] * x[t] + sum(size[j] * x[j] for j in sources)) / total)
        else:
            out.append((1 - sum(weight[j] for j in sources)) * x[t] + sum(weight[j] * x[j] for j in sources))
    return torch.stack(out)


def test_weighted_merge_equals_brute_force_with_padding():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, generator=generator, dtype=torch.float64)
    # row 0 keeps 3 tokens and merges 3; row 1 keeps 2 (one padding output) and merges 2 (one padding source)
    keep = torch.tensor([[0, 2, 5], [6, 1, 4]])
    src = torch.tensor([[1, 3, 4], [0, 3, 6]])
    dst = torch.tensor([[0, 0, 2], [1, 2, 0]])
    weight = torch.tensor([[0.25, 0.5, 0.4], [0.3, 0.6, 0.0]], dtype=torch.float64)
    plan = Plan(keep=keep, num_inputs=6, src=src, dst=dst, padded=True, weight=weight)
    out, size = plan.weighted_mean(x, torch.ones(2, 6, 1, dtype=torch.float64))
    shares = [{1: 0.25, 3: 0.5, 4: 0.4}, {0: 0.3, 3: 0.6}]
    torch.testing.assert_close(out[0], brute_force_merge(x[0], [0, 2, 5], {1: 0, 3: 0, 4: 5}, shares[0]))
    torch.testing.assert_close(out[1, 1:], brute_force_merge(x[1], [1, 4], {0: 1, 3: 4}, shares[1]))
    assert torch.equal(out[1, 0], torch.zeros(3, dtype=torch.float64))  # the padding output
    assert size[..., 0].tolist() == [[3, 1, 2], [0, 2, 2]]  # sizes add up whatever the weights


def test_without_weights_the_merge_is_size_weighted():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 5, 4, generator=generator, dtype=torch.float64)
    size = torch.tensor([[[1.0], [2.0], [3.0], [1.0], [4.0]]], dtype=torch.float64)
    plan = Plan(keep=torch.tensor([[4, 0]]), num_inputs=5, src=torch.tensor([[1, 2, 3]]), dst=torch.tensor([[1, 0, 1]]))
    out, out_size = plan.weighted_mean(x, size)
    torch.testing.assert_close(out[0], brute_force_merge(x[0], [4, 0], {1: 0, 2: 4, 3: 0}, size=size[0]))
    assert out_size[0, :, 0].tolist() == [7, 4]


@pytest.mark.parametrize("with_weight", [True, False])
def test_sequence_plan_carries_each_tokens_weight(with_weight):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 8, 2, generator=generator, dtype=torch.float64)
    keep = torch.tensor([[1, 0, 1, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1, 1, 1]]).bool()
    merge_into = torch.full((3, 8), -1)
    merge_into[0, [1, 3, 4]] = torch.tensor([0, 2, 2])
    merge_into[1, [4, 6]] = torch.tensor([7, 2])  # row 1 keeps 3 (one padding output), merges 2 (one padding source)
    weight = torch.rand(3, 8, generator=generator, dtype=torch.float64) * (merge_into >= 0)
    plan = sequence_plan(keep, merge_into, weight if with_weight else None)
    assert (plan.weight is not None) == with_weight
    if with_weight:  # each source's weight, 0 for padding sources
        real = plan.src < 8
        assert torch.equal(plan.weight[real], weight.gather(1, plan.src.clamp(max=7))[real])
        assert bool((plan.weight[~real] == 0).all())
    out = plan.weighted_mean(x, torch.ones(3, 8, 1, dtype=torch.float64))[0]
    for b in range(3):
        kept = keep[b].nonzero().squeeze(1).tolist()
        merges = {j: int(merge_into[b, j]) for j in range(8) if merge_into[b, j] >= 0}
        shares = weight[b].tolist() if with_weight else None
        expected = brute_force_merge(x[b], kept, merges, shares, size=torch.ones(8, 1, dtype=torch.float64))
        torch.testing.assert_close(out[b, plan.num_outputs - len(kept):], expected)
