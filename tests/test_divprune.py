"""DivPrune's greedy max-min selection against a brute-force version of the rule."""
import pytest
import torch

from tokred.reducers.divprune import select


def brute_force_select(features, k):
    """The rule written out for one image with Python loops."""
    n = features.shape[0]
    unit = torch.nn.functional.normalize(features.double(), dim=-1)
    d = [[1 - float(unit[i] @ unit[j]) for j in range(n)] for i in range(n)]
    nearest = [min(d[i][j] for j in range(n) if j != i) if n > 1 else float("inf") for i in range(n)]
    chosen = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(chosen) < k:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(d[i][s] for s in chosen), -i)))
    return sorted(chosen)


@pytest.mark.parametrize("n,k", [(12, 1), (12, 5), (30, 12), (9, 9), (1, 1)])
def test_selection_equals_brute_force(n, k):
    torch.manual_seed(n + k)
    features = torch.randn(3, n, 7)
    got = select(features, k)
    assert got.dtype == torch.long and got.shape == (3, k)
    for b in range(3):
        assert got[b].tolist() == brute_force_select(features[b], k)


def test_hand_worked_case_with_ties():
    # tokens 0, 2, 3 are identical (distance 0), 1 is orthogonal to all (distance 1), 4 is opposite
    # to 0, 2, 3 (distance 2). Nearest other token: 0, 2, 3 -> 0; 1 -> 1; 4 -> 1 (token 1).
    # First pick: 1 and 4 tie at 1 -> the lower index, 1. Second: 0, 2, 3, 4 are all at 1 from {1}
    # -> 0. Third: 2 and 3 are at 0 from {0, 1}, 4 is at 1 -> 4.
    features = torch.tensor([[[1.0, 0], [0, 1], [1, 0], [1, 0], [-1, 0]]])
    assert select(features, 1).tolist() == [[1]]
    assert select(features, 2).tolist() == [[0, 1]]
    assert select(features, 3).tolist() == [[0, 1, 4]]


@pytest.mark.parametrize("k", [0, 6, 2.0, True])
def test_bad_k(k):
    with pytest.raises(ValueError, match="k must be"):
        select(torch.randn(1, 5, 3), k)


def test_bad_shape():
    with pytest.raises(ValueError, match="batch, tokens, channels"):
        select(torch.randn(5, 3), 2)
