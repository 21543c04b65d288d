"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024): before decoder
layer K (default 2), keep the visual tokens the last prompt token attends to most at layer K - 1.

The attention row (averaged over heads) is computed by the adapter and handed over as
``SequenceSignal.last_attention``; ranking ties go to the lower position. Text is never pruned.

:func:`select` is the rule for one sample as a pure function; :class:`FastV` applies it at the
``llm`` stage of a vision-language model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from tokred.reducers.base import DecoderReducer, check_finite
from tokred.sequence import keep_visual

if TYPE_CHECKING:
    from tokred.signals import SequenceSignal


def select(attention: Tensor, visual: Tensor, k: int) -> Tensor:
    """Positions (k,), ascending, of the k visual tokens with the highest ``attention`` in one sample.

    Args:
        attention: (L,) attention the last prompt token gives every token (averaged over heads).
        visual: (L,) True for the visual tokens (the candidates).
        k: visual tokens to keep, 1 <= k <= visual.sum(). Ties go to the lower position.
    """
    if attention.dim() != 1 or visual.shape != attention.shape or visual.dtype != torch.bool:
        raise ValueError(f"expected attention (L,) and a bool visual mask (L,), got {tuple(attention.shape)} and "
                         f"{tuple(visual.shape)} {visual.dtype}")
    check_finite("FastV", "the attention row", attention[visual])
    positions = visual.nonzero().squeeze(1)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(positions):
        raise ValueError(f"k must be an int in [1, {len(positions)}] (the number of visual tokens), got {k!r}")
    order = torch.sort(attention[positions], descending=True, stable=True).indices[:k]
    return positions[order].sort().values


@dataclass(frozen=True)
class FastV(DecoderReducer):
    """FastV at the ``llm`` stage: before decoder layer ``layer``, each sample keeps the visual
    tokens that its last prompt token attends to most at layer ``layer - 1``.

    Args:
        keep: visual tokens kept per sample: a fraction in (0, 1] (round(keep * N), at least 1), a
            count, or a :class:`~tokred.Budget` (measured on the sample's visual hidden states).
        layer: the decoder layer K before which visual tokens are pruned (K >= 1; the attention
            comes from layer K - 1).
        positions: position ids of the remaining tokens: ``"keep"`` (the original positions,
            with gaps, as FastV does) or ``"renumber"`` (contiguous).

    Samples without visual tokens are left untouched.
    """

    keep: int | float
    layer: int = 2
    positions: str = "keep"

    needs_last_attention: ClassVar[bool] = True

    def keep_mask(self, signal: SequenceSignal) -> Tensor:
        if signal.last_attention is None:
            raise ValueError("FastV needs the last prompt token's attention row at decoder layer K - 1 "
                             "(SequenceSignal.last_attention), got None")
        return keep_visual(signal, self.keep, lambda b, k: select(signal.last_attention[b], signal.visual[b], k))

    def overhead_flops(self, signal: SequenceSignal) -> int:
        return 0  # the adapter computes (and counts) the attention row
