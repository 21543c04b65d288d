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
import torch.nn.functional as F
from torch import Tensor

from tokred.plan import Plan
from tokred.reducers.base import Reducer

if TYPE_CHECKING:
    from tokred.engine import Signal


def token_scores(signal: Signal) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The two scores thresholds are compared with, for every token of ``signal``.

    Returns (alive (B, N) bool, importance (B, N), best match score of A tokens (B, Na), index
    of that match among the B tokens (B, Na)). Importance is the attention a token receives,
    averaged over heads and live queries, times the number of live tokens (1 = average).
    A = even positions after the protected prefix, B = odd ones, as in ToMe; dead (padding) and
    protected tokens take no part in matching.
    """
    heads, protected = signal.heads, signal.num_protected
    batch, num_tokens = signal.tokens.shape[:2]
    alive = (signal.sizes[..., 0] > 0) if signal.sizes is not None else signal.tokens.new_ones(
        batch, num_tokens, dtype=torch.bool)
    weights = alive.to(heads.q.dtype)
    importance = heads.received(weights) * weights.sum(dim=1, keepdim=True)
    first_a = protected + protected % 2
    first_b = protected + 1 - protected % 2
    unit = F.normalize(signal.keys, dim=-1)
    scores = unit[:, first_a::2] @ unit[:, first_b::2].transpose(-1, -2)
    scores = scores.masked_fill(~alive[:, first_b::2, None].transpose(1, 2), -math.inf)
    best, best_b = scores.max(dim=-1)
    return alive, importance, best, best_b


def threshold_plan(signal: Signal, merge_threshold: float, prune_threshold: float) -> Plan:
    """The hard rule: prune below ``prune_threshold``, merge above ``merge_threshold``.

    A token is pruned when its importance is below the prune threshold; an A token that is not
    pruned merges into its best B match when the score is above the merge threshold and that B
    token is not pruned. Protected tokens always survive. Survivors keep their order; images
    with fewer survivors are padded (``Plan.padded``).
    """
    protected = signal.num_protected
    batch, num_tokens = signal.tokens.shape[:2]
    alive, importance, best, best_b = token_scores(signal)
    positions = torch.arange(num_tokens, device=alive.device)
    pruned = alive & (importance < prune_threshold) & (positions >= protected)
    first_a = protected + protected % 2
    first_b = protected + 1 - protected % 2
    a_positions = positions[first_a::2]
    target = first_b + 2 * best_b
    merged_a = (best > merge_threshold) & alive[:, first_a::2] & ~pruned[:, first_a::2]
    merged_a &= ~pruned.gather(1, target)
    merged = torch.zeros_like(alive)
    merged[:, first_a::2] = merged_a
    survives = alive & ~pruned & ~merged
    counts = survives.sum(dim=1)
    width = int(counts.max())
    order = torch.where(survives, positions, num_tokens).sort(dim=1).values  # survivors first, in order
    keep = order[:, :width]
    output_position = survives.long().cumsum(dim=1) - 1
    num_merged = int(merged_a.sum(dim=1).max())
    src = torch.where(merged_a, a_positions, num_tokens).sort(dim=1).values[:, :num_merged]
    src_target = torch.where(merged_a, target, 0).gather(1, merged_a.long().argsort(dim=1, descending=True,
                                                                                     stable=True)[:, :num_merged])
    dst = output_position.gather(1, src_target).clamp(min=0)
    padded = bool((counts != width).any()) or bool((merged_a.sum(dim=1) != num_merged).any())
    return Plan(keep=keep, num_inputs=num_tokens, src=src, dst=dst, padded=padded)


def _per_layer(value, num_layers: int, name: str) -> list[float]:
    values = list(value) if isinstance(value, Sequence) else [value] * num_layers
    if len(values) != num_layers:
        raise ValueError(f"{len(values)} {name} thresholds given for a model with {num_layers} blocks")
    return [float(v) for v in values]


@dataclass(frozen=True)
class Thresholds(Reducer):
    """Per-block merge and prune thresholds (hard at inference; :func:`tokred.calibrate` learns them).

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
        if not isinstance(self.prop_attn, bool):
            raise TypeError(f"prop_attn must be True or False, got {self.prop_attn!r}")

    @property
    def proportional_attention(self) -> bool:
        return self.prop_attn

    def check(self, num_layers: int) -> None:
        _per_layer(self.merge, num_layers, "merge")
        _per_layer(self.prune, num_layers, "prune")

    def thresholds_at(self, layer: int, num_layers: int) -> tuple[float, float]:
        return _per_layer(self.merge, num_layers, "merge")[layer], _per_layer(self.prune, num_layers, "prune")[layer]

    def removes(self, layer: int, num_layers: int, signal: Signal) -> int:
        merge, prune = self.thresholds_at(layer, num_layers)
        if merge == math.inf and prune == -math.inf:
            return 0
        return signal.tokens.shape[1] - signal.num_protected  # an upper bound: decided per token

    def plan(self, layer: int, num_layers: int, signal: Signal) -> Plan:
        return threshold_plan(signal, *self.thresholds_at(layer, num_layers))

    def overhead_flops(self, signal: Signal) -> int:
        batch, num_tokens, dim = signal.keys.shape
        first_a = signal.num_protected + signal.num_protected % 2
        num_a = len(range(first_a, num_tokens, 2))
        return signal.heads.flops() + 2 * batch * num_a * (num_tokens - signal.num_protected - num_a) * dim
