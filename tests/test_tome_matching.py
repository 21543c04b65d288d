"""ToMe's bipartite soft matching and merge, against a brute-force version of the rule."""
import math

import pytest
import torch

from tokred import ToMe, bipartite_soft_matching
from tokred.plan import follow
from tokred.schedule import per_layer

from helpers import brute_force_merge


@pytest.mark.parametrize("protected", [0, 1, 2, 5])
@pytest.mark.parametrize("n,r", [(17, 4), (16, 7), (24, 5), (10, 100), (9, 0)])
def test_matching_equals_brute_force(protected, n, r):
    torch.manual_seed(n * 10 + protected)
    batch = 3
    metric = torch.randn(batch, n, 6, dtype=torch.float64)
    x = torch.randn(batch, n, 5, dtype=torch.float64)
    size = torch.randint(1, 4, (batch, n, 1)).double()
    plan = bipartite_soft_matching(metric, r, protected)
    out_x, out_size = plan.weighted_mean(x, size)
    source = follow(torch.arange(n).expand(batch, n), plan)
    for i in range(batch):
        want_x, want_size, want_groups = brute_force_merge(metric[i], x[i], size[i], r, protected)
        torch.testing.assert_close(out_x[i], want_x)
        torch.testing.assert_close(out_size[i], want_size)
        got_groups = [sorted((source[i] == t).nonzero().flatten().tolist()) for t in range(out_x.shape[1])]
        assert got_groups == want_groups


def test_ties_go_to_lowest_position():
    metric = torch.ones(1, 9, 4)  # every pair has similarity 1
    plan = bipartite_soft_matching(metric, 2, num_protected=1)
    # A = even positions 2, 4, 6, 8 (0 is protected); the two lowest merge, into B position 1
    assert plan.src.tolist() == [[2, 4]]
    assert plan.keep.tolist() == [[0, 6, 8, 1, 3, 5, 7]]
    assert plan.dst.tolist() == [[3, 3]]


def test_without_a_protected_token_unmerged_a_stay_in_descending_score_order():
    # A = 0, 2, 4; B = 1, 3, 5. Best matches: 4 -> 1 (cos 1), 2 -> 1 (0.71, a tie with 3), 0 -> 5 (0.55)
    metric = torch.tensor([[[-1.0, -1.5], [1, 0], [1, 1], [0, 1], [1, 0], [-1, 0]]])
    plan = bipartite_soft_matching(metric, 1, num_protected=0)
    assert plan.src.tolist() == [[4]] and plan.dst.tolist() == [[2]]
    assert plan.keep.tolist() == [[2, 0, 1, 3, 5]]  # unmerged A by descending score, then B
    assert bipartite_soft_matching(metric, 1, num_protected=1).keep.tolist() == [[0, 2, 1, 3, 5]]  # by position


def test_merge_invariants():
    torch.manual_seed(0)
    metric, x = torch.randn(4, 33, 8), torch.randn(4, 33, 16, dtype=torch.float64)
    size = torch.randint(1, 5, (4, 33, 1)).double()
    plan = bipartite_soft_matching(metric, 10, num_protected=1)
    out_x, out_size = plan.weighted_mean(x, size)
    assert out_x.shape == (4, 23, 16)
    torch.testing.assert_close(out_size.sum(1), size.sum(1))  # sizes sum to the input count
    torch.testing.assert_close((out_x * out_size).sum(1) / out_size.sum(1), (x * size).sum(1) / size.sum(1))
    torch.testing.assert_close(out_x[:, 0], x[:, 0])  # class token untouched and first
    assert plan.destinations().min() >= 0  # merging never drops a token


def test_r_is_capped_at_half_of_the_mergeable_tokens():
    plan = bipartite_soft_matching(torch.randn(2, 12, 4), 50, num_protected=3)
    assert plan.num_outputs == 12 - (12 - 3) // 2


@pytest.mark.parametrize("r,layers,expected", [
    (3, 4, [3, 3, 3, 3]),
    ([5, 2], 4, [5, 2, 0, 0]),
    ((4, 0.0), 3, [4, 4, 4]),
    ((4, -0.5), 5, [6, 5, 4, 3, 2]),
    ((4, 0.5), 5, [2, 3, 4, 5, 6]),
])
def test_schedules(r, layers, expected):
    assert per_layer(r, layers) == expected


def test_inflection_schedule_keeps_the_total():
    for inflection in (-1.0, -0.3, 0.25, 1.0):
        total = sum(per_layer((10, inflection), 12))
        assert abs(total - 120) <= 12
        assert math.isclose(per_layer((10, inflection), 12)[0], 10 * (1 - inflection), abs_tol=1)


@pytest.mark.parametrize("bad,error", [
    (-1, ValueError), (1.5, TypeError), ("8", TypeError), (True, TypeError), ([2, -1], ValueError),
    ([1.0, 2], ValueError), ((4, 2.0), ValueError), ((4,), TypeError), ((-4, 0.0), ValueError), (None, TypeError),
])
def test_bad_r(bad, error):
    with pytest.raises(error, match="r"):
        ToMe(r=bad)


def test_schedule_longer_than_the_model():
    with pytest.raises(ValueError, match="only 4 blocks"):
        per_layer([1] * 5, 4)
