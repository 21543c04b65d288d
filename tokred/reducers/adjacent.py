"""Adjacent merging inside the language model (tokred's baseline for ``llm``-stage merging).

Before decoder layer K, each sample merges its most similar *neighbouring* visual tokens: of the
links between two visual tokens that sit next to each other in the sequence, the N - k with the
highest cosine similarity of their hidden states (entering layer K, through the final norm) are
merged; each run of merged links becomes one token at the run's first position (its position id),
carrying the size-weighted mean of the run and its size. With ``prop_attn`` (default) later layers
add log(size) to the attention logits, so a token standing for s tokens attends like s copies.

:func:`select` is the rule for one sample as a pure function; :class:`AdjacentMerge` applies it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from tokred.plan import Plan, sequence_plan
from tokred.reducers.base import DecoderReducer, check_finite, check_flag
from tokred.sequence import visual_count

if TYPE_CHECKING:
    from tokred.signals import SequenceSignal


def select(hidden: Tensor, visual: Tensor, k: int) -> Tensor:
    """(L,) index of the token each token merges into (its run's first token), -1 for tokens that stay.

    Args:
        hidden: (L, C) hidden states of one sample.
        visual: (L,) True for the visual tokens.
        k: visual tokens to keep, 1 <= k <= visual.sum(). Only neighbouring visual tokens can merge,
            so a sample with several visual items keeps at least one token per item (more than k
            when k is smaller than the number of items).

    Rule: links (i, i + 1) between two visual tokens; the N - k links with the highest cosine
    similarity merge (ties to the lower position); a token whose link to its left neighbour merged
    joins that neighbour's run.
    """
    length = hidden.shape[0]
    num_visual = int(visual.sum())
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_visual:
        raise ValueError(f"k must be an int in [1, {num_visual}] (the number of visual tokens), got {k!r}")
    check_finite("AdjacentMerge", "the hidden states", hidden[visual])
    merge_into = torch.full((length,), -1, dtype=torch.long, device=hidden.device)
    links = (visual[:-1] & visual[1:]).nonzero().squeeze(1)  # link i joins tokens i and i + 1
    merges = min(num_visual - k, len(links))
    if merges == 0:
        return merge_into
    unit = F.normalize(hidden.to(torch.promote_types(hidden.dtype, torch.float32)), dim=-1)
    score = (unit[links] * unit[links + 1]).sum(dim=-1)
    chosen = links[torch.sort(score, descending=True, stable=True).indices[:merges]]
    merged = torch.zeros(length, dtype=torch.bool, device=hidden.device)
    merged[chosen + 1] = True
    positions = torch.arange(length, device=hidden.device)
    run_start = torch.where(merged, 0, positions).cummax(dim=0).values
    return torch.where(merged, run_start, merge_into)


@dataclass(frozen=True)
class AdjacentMerge(DecoderReducer):
    """Merge neighbouring similar visual tokens before decoder layer ``layer`` (see the module docstring).

    Args:
        keep: visual tokens kept per sample: a fraction in (0, 1] (round(keep * N), at least 1) or a count.
        layer: the decoder layer K before which tokens merge (K >= 1).
        prop_attn: add log(token size) to the attention logits of the layers after the merge.
        positions: ``"keep"`` (a merged token has its run's first position) or ``"renumber"``.
    """

    keep: int | float
    layer: int = 2
    prop_attn: bool = True
    positions: str = "keep"

    def __post_init__(self):
        super().__post_init__()
        check_flag("prop_attn", self.prop_attn)

    def plan_sequence(self, signal: SequenceSignal) -> Plan:
        merge_into = torch.full(signal.visual.shape, -1, dtype=torch.long, device=signal.visual.device)
        for b, num_visual in enumerate(signal.visual.sum(dim=1).tolist()):
            if num_visual:
                merge_into[b] = select(signal.hidden[b], signal.visual[b], visual_count(self.keep, signal, b))
        return sequence_plan(signal.valid & (merge_into < 0), merge_into)

    def overhead_flops(self, signal: SequenceSignal) -> int:
        links = int((signal.visual[:, :-1] & signal.visual[:, 1:]).sum())
        return 2 * links * signal.hidden.shape[-1]
