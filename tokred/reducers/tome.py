"""ToMe: Token Merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023).

In every block, after attention and before the MLP, the r most similar token pairs are merged
by bipartite soft matching on the attention keys averaged over heads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tokred.plan import Plan
from tokred.reducers.base import Reducer, check_flag
from tokred.schedule import check_schedule, per_layer

if TYPE_CHECKING:
    from tokred.signals import Signal


def a_output_order(best: Tensor, num_protected: int) -> Tensor:
    """Sort keys (B, K) for K tokens with best-match scores ``best`` (B, K), in position order: ToMe's
    output lays out its unmerged A tokens by ascending key. That is by position when a token is
    protected (class, distillation, registers), and in descending best-match order, ties to the
    lower position, when none is (e.g. SigLIP towers), as the original ToMe leaves them. The order
    decides the next block's A/B split, so it is part of the method."""
    if num_protected:
        return torch.arange(best.shape[-1], device=best.device).expand_as(best)
    return descending_rank(best)


def descending_rank(scores: Tensor) -> Tensor:
    """(B, K) rank of every score of ``scores`` (B, K) in its row's descending order; ties: the lower
    position ranks first (a stable sort)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(scores)
    return torch.empty_like(order).scatter_(-1, order, positions)


def bipartite_soft_matching(metric: Tensor, r: int, num_protected: int = 0) -> Plan:
    """ToMe's bipartite soft matching, as a pure function.

    Args:
        metric: (B, N, D) per-token features to compare (ToMe: keys averaged over heads).
        r: tokens to remove; capped at half of the mergeable tokens, ``(N - num_protected) // 2``.
        num_protected: leading tokens (class, distillation, register) that never merge.

    Rule: tokens are split by position into A (even) and B (odd); every unprotected A token
    finds its most cosine-similar unprotected B token; the r A tokens with the highest such
    score merge into their match. Output order: protected tokens, unmerged A tokens
    (:func:`a_output_order`: by position when a token is protected, else by descending score),
    then all B tokens in their original order. Ties in score go to the lower position.

    Returns:
        A merge :class:`~tokred.plan.Plan` from N to N - r tokens (r after capping).
    """
    batch, num_tokens, _ = metric.shape
    protected = num_protected
    r = max(0, min(r, (num_tokens - protected) // 2))
    first_a = protected + protected % 2  # first even position after the protected tokens
    first_b = protected + 1 - protected % 2
    num_a = len(range(first_a, num_tokens, 2))
    num_b = len(range(first_b, num_tokens, 2))
    device = metric.device
    prefix = torch.arange(protected, device=device).expand(batch, -1)
    b_positions = torch.arange(first_b, num_tokens, 2, device=device).expand(batch, -1)
    if r == 0:
        keep = torch.arange(num_tokens, device=device).expand(batch, -1)
        return Plan(keep=keep, num_inputs=num_tokens)

    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, first_a::2], metric[:, first_b::2]
    scores = a @ b.transpose(-1, -2)
    best_score, best_b = scores.max(dim=-1)
    order = best_score.argsort(dim=-1, descending=True, stable=True)
    merged_a = order[:, :r]
    num_kept_a = num_a - r
    # a_output_order's rule on the order at hand: by position with a protected token, else as sorted (descending)
    unmerged_a = order[:, r:].sort(dim=-1).values if protected else order[:, r:]
    keep = torch.cat([prefix, first_a + 2 * unmerged_a, b_positions], dim=1)
    src = first_a + 2 * merged_a
    dst = protected + num_kept_a + best_b.gather(1, merged_a)
    assert keep.shape[1] == protected + num_kept_a + num_b
    return Plan(keep=keep, num_inputs=num_tokens, src=src, dst=dst)


def matching_flops(batch: int, num_tokens: int, dim: int, num_protected: int) -> int:
    """FLOPs of the A x B similarity matmul in :func:`bipartite_soft_matching`."""
    mergeable = num_tokens - num_protected
    first_a = num_protected + num_protected % 2
    num_a = len(range(first_a, num_tokens, 2))
    return 2 * batch * num_a * (mergeable - num_a) * dim


@dataclass(frozen=True)
class ToMe(Reducer):
    """Token Merging in the vision encoder.

    Args:
        r: tokens merged away per block: an int, an ``(r, inflection)`` schedule or a list with
            one r per block (shorter lists are padded with zeros). Capped per block at half of
            the mergeable tokens; the trace notes every cap.
        prop_attn: proportional attention, adding log(token size) to the attention logits.
    """

    r: int | tuple[int, float] | list[int] = 0
    prop_attn: bool = True

    stage = "vision"
    pools_plain_mean = True

    def __post_init__(self):
        check_schedule(self.r)
        check_flag("prop_attn", self.prop_attn)

    def check(self, num_layers: int) -> None:
        per_layer(self.r, num_layers)

    def removes(self, layer: int, num_layers: int, signal: Signal) -> int:
        return per_layer(self.r, num_layers)[layer]

    def plan(self, layer: int, num_layers: int, signal: Signal) -> Plan:
        keys, num_protected = signal.keys, signal.num_protected
        return bipartite_soft_matching(keys, self.removes(layer, num_layers, signal), num_protected)

    def overhead_flops(self, signal: Signal) -> int:
        return matching_flops(*signal.keys.shape, signal.num_protected)
