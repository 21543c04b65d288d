"""Learned thresholds for merging and pruning (LTMP: Bonnaerens & Dambre, "Learned Thresholds
Token Merging and Pruning for Vision Transformers", TMLR 2023; the same idea as ATP-LLaVA's
adaptive pruning thresholds).

In every block, after attention, each token is pruned when the attention it receives is below
the layer's prune threshold, and merged (ToMe's bipartite split) into its most similar token
when that similarity is above the layer's merge threshold. The decisions are per token, so
every image keeps its own number of tokens; a batch is padded, and padding is masked out of
attention and pooling.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tokred.plan import Plan
from tokred.reducers.base import Reducer, check_finite, check_flag, per_block
from tokred.reducers.dtome import best_matches

if TYPE_CHECKING:
    from tokred.signals import Signal


def token_scores(signal: Signal) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The two scores thresholds are compared with, for every token of ``signal``.

    Returns, each (B, N): alive (size > 0), importance, is_a, best match score and the index of
    the best match. Importance is the attention a token receives, averaged over heads and live
    queries, times the number of live tokens (1 = average). Matching is ToMe's bipartite split
    counted over the live tokens: the unprotected live tokens at even rank among the live
    tokens form A, those at odd rank form B, and each A token's best match is its most
    cosine-similar B token (:func:`tokred.reducers.dtome.best_matches`, shared with DToMe). Dead
    tokens (size 0: padding, or tokens calibration has removed in place) take no part; in a
    compacted sequence rank and position coincide, as in ToMe.
    """
    alive, is_a, best, best_index = best_matches(signal.keys, signal.num_protected, signal.sizes)
    weights = alive.to(signal.heads.q.dtype)
    importance = signal.heads.received(weights) * weights.sum(dim=1, keepdim=True)
    check_finite("Thresholds", "the importance (attention received; its logits can overflow)", importance)
    return alive, importance, is_a, best, best_index


def last_token_guard(alive: Tensor, importance: Tensor, removed: Tensor, num_protected: int) -> Tensor:
    """(B, N) bool: the most important live patch token (past the ``num_protected`` prefix) of
    every image whose live patch tokens would all be removed, so no image is left with only its
    protected tokens (average pooling over no patch token is NaN)."""
    patch = alive.clone()
    patch[:, :num_protected] = False
    emptied = ~(patch & ~removed).any(dim=1, keepdim=True) & patch.any(dim=1, keepdim=True)
    best = importance.masked_fill(~patch, -math.inf).argmax(dim=1, keepdim=True)
    return torch.zeros_like(alive).scatter_(1, best, True) & emptied


def threshold_plan(signal: Signal, merge_threshold: float, prune_threshold: float) -> Plan:
    """The hard rule: prune below ``prune_threshold``, merge above ``merge_threshold``.

    A token is pruned when its importance is below the prune threshold; an A token that is not
    pruned merges into its best B match when the score is above the merge threshold and that B
    token is not pruned. Protected tokens always survive, and so does an image's most important
    patch (unprotected) token when every patch token would go. Survivors keep their order; images with fewer
    survivors are padded (``Plan.padded``).
    """
    protected = signal.num_protected
    num_tokens = signal.tokens.shape[1]
    alive, importance, is_a, best, target = token_scores(signal)
    positions = torch.arange(num_tokens, device=alive.device)
    pruned = alive & (importance < prune_threshold) & (positions >= protected)
    merged = is_a & ~pruned & (best > merge_threshold) & ~pruned.gather(1, target)
    spared = last_token_guard(alive, importance, pruned | merged, protected)
    pruned, merged = pruned & ~spared, merged & ~spared
    survives = alive & ~pruned & ~merged
    counts, merge_counts = survives.sum(dim=1), merged.sum(dim=1)
    # the widest image sets the width; an empty batch (no image) keeps every position and merges nothing
    width = int(counts.max()) if counts.numel() else num_tokens
    num_merged = int(merge_counts.max()) if merge_counts.numel() else 0
    keep = torch.where(survives, positions, num_tokens).sort(dim=1).values[:, :width]  # survivors first, in order
    src = torch.where(merged, positions, num_tokens).sort(dim=1).values[:, :num_merged]
    output_position = survives.long().cumsum(dim=1) - 1
    dst = output_position.gather(1, target.gather(1, src.clamp(max=num_tokens - 1))).clamp(min=0)
    padded = bool((counts != width).any() or (merge_counts != num_merged).any())
    return Plan(keep=keep, num_inputs=num_tokens, src=src, dst=dst, padded=padded)


@dataclass(frozen=True)
class Thresholds(Reducer):
    """Per-block merge and prune thresholds (hard at inference; :func:`tokred.calibrate` learns them).

    Every image keeps at least one patch token: when all its patch tokens would go, its most
    important one (by attention received) stays, so average pooling never averages nothing.

    Args:
        merge: merge threshold on the cosine similarity of keys (one float, or one per block);
            +inf never merges.
        prune: prune threshold on importance (attention received, 1 = average; one float or one
            per block); -inf never prunes.
        temperature: of the sigmoid soft masks used while calibrating.
        prop_attn: proportional attention for merged tokens.
    """

    merge: float | Sequence[float] = math.inf
    prune: float | Sequence[float] = -math.inf
    temperature: float = 0.1
    prop_attn: bool = True

    stage = "vision"
    needs_heads = True
    decides_per_token = True

    def __post_init__(self):
        for name in ("merge", "prune"):
            value = getattr(self, name)
            values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) for v in values):
                raise ValueError(f"{name} thresholds must be numbers (±inf allowed), got {value!r}")
        if (isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float))
                or not math.isfinite(self.temperature) or self.temperature <= 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        check_flag("prop_attn", self.prop_attn)

    def check(self, num_layers: int) -> None:
        per_block(self.merge, num_layers, "merge")
        per_block(self.prune, num_layers, "prune")

    def thresholds_at(self, layer: int, num_layers: int) -> tuple[float, float]:
        return per_block(self.merge, num_layers, "merge")[layer], per_block(self.prune, num_layers, "prune")[layer]

    def removes(self, layer: int, num_layers: int, signal: Signal) -> int:
        merge, prune = self.thresholds_at(layer, num_layers)
        if merge == math.inf and prune == -math.inf:
            return 0
        return signal.tokens.shape[1] - signal.num_protected  # an upper bound: decided per token

    def plan(self, layer: int, num_layers: int, signal: Signal) -> Plan:
        return threshold_plan(signal, *self.thresholds_at(layer, num_layers))

    def overhead_flops(self, signal: Signal) -> int:
        """Importance (one QK^T) and the token-by-token cosine similarities."""
        batch, num_tokens, dim = signal.keys.shape
        return signal.heads.flops() + 2 * batch * num_tokens * num_tokens * dim
