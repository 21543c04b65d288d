"""DivPrune's selection (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large
Multimodal Models", CVPR 2025): keep the k visual tokens that solve the max-min diversity
problem greedily.

:func:`select` is the rule as a pure function; :class:`DivPrune` applies it at the ``projector``
stage of a vision-language model, to each image's projected visual tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tokred.plan import Plan
from tokred.reducers.base import Reducer, check_finite, check_keep, check_positions
from tokred.reducers.budget import kept_counts, padded_prefixes
from tokred.signals import Layout


def select(features: Tensor, k: int) -> Tensor:
    """Indices (B, k), ascending, of the tokens DivPrune keeps from ``features`` (B, N, C): the
    first k of :func:`greedy_order`."""
    return greedy_order(features, k).sort(dim=-1).values


def greedy_order(features: Tensor, k: int) -> Tensor:
    """Indices (B, k), in pick order, of DivPrune's first k picks from ``features`` (B, N, C); the
    order is nested (the first j picks are the picks for j), so it serves every budget at once.

    Distance is 1 - cosine similarity. The first pick is the token whose nearest other token is
    farthest away; every further pick is the token farthest from the tokens picked so far (its
    distance to the set is the distance to its nearest picked token). Ties go to the lowest
    index. Vectorised over the batch: k steps of O(N) work per image after one N x N distance
    matrix.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be (batch, tokens, channels), got shape {tuple(features.shape)}")
    batch, num_tokens, _ = features.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_tokens:
        raise ValueError(f"k must be an int in [1, {num_tokens}] (the number of tokens), got {k!r}")
    check_finite("DivPrune", "the visual features", features)
    unit = F.normalize(features.float(), dim=-1)
    distance = 1 - unit @ unit.transpose(-1, -2)
    eye = torch.eye(num_tokens, dtype=torch.bool, device=features.device)
    nearest_other = distance.masked_fill(eye, torch.inf).amin(dim=-1)
    rows = torch.arange(batch, device=features.device)
    pick = nearest_other.argmax(dim=-1)  # argmax returns the first maximum: ties to the lowest index
    picked = torch.zeros(batch, num_tokens, dtype=torch.bool, device=features.device)
    to_set = torch.full((batch, num_tokens), torch.inf, device=features.device)
    order = []
    for _ in range(k):
        order.append(pick)
        picked[rows, pick] = True
        to_set = torch.minimum(to_set, distance[rows, pick])
        pick = to_set.masked_fill(picked, -torch.inf).argmax(dim=-1)
    return torch.stack(order, dim=1)


def select_flops(num_tokens: int, channels: int) -> int:
    """FLOPs of :func:`select` for one image: the N x N cosine-similarity matmul."""
    return 2 * num_tokens * num_tokens * channels


@dataclass(frozen=True)
class DivPrune(Reducer):
    """DivPrune at the ``projector`` stage: each image keeps its most diverse visual tokens.

    Args:
        keep: tokens kept per image: a fraction in (0, 1] (round(keep * N), at least 1), a count, or a
            :class:`~tokred.Budget` (each image its own fraction, from its content).
        positions: position ids of the remaining tokens in the language model: ``"renumber"``
            (contiguous, as DivPrune does), ``"keep"`` (the original positions, with gaps), or None
            (the model's default: renumber for 1-D positions, keep for Qwen2-VL's 3-D M-RoPE).
    """

    keep: int | float
    positions: str | None = None

    stage = "projector"

    def __post_init__(self):
        check_keep(self.keep)
        check_positions(self.positions)

    def plan_images(self, features: Tensor, layout: Layout | None) -> Plan:
        # the greedy order is nested: with per-image counts (a Budget) each image keeps a prefix of it
        counts = kept_counts(self.keep, features)
        return padded_prefixes(greedy_order(features, max(counts)), counts, features.shape[1])

    def overhead_flops(self, features: Tensor, layout: Layout | None = None) -> int:
        images, num_tokens, channels = features.shape
        return images * select_flops(num_tokens, channels)
