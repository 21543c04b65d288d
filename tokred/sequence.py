"""Helpers for ``llm``-stage reducers: keep masks over a batch of language-model sequences.

A vision-language model's sequence mixes text tokens and visual tokens. Reducers at the
``llm`` stage look at the hidden states entering decoder layer K (a
:class:`~tokred.signals.SequenceSignal`) and return a plan (:func:`tokred.plan.sequence_plan`);
text is never removed. Sequences are left-padded; ``valid`` marks real tokens.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from tokred.signals import SequenceSignal


def keep_visual(signal: SequenceSignal, keep, choose: Callable[[int, int], Tensor]) -> Tensor:
    """(B, L) keep mask: every non-visual token, and per sample b with visual tokens the positions
    ``choose(b, k)`` returns, k = :func:`visual_count` of ``keep``."""
    mask = ~signal.visual
    for b, num_visual in enumerate(signal.visual.sum(dim=1).tolist()):
        if num_visual:
            mask[b, choose(b, visual_count(keep, signal, b))] = True
    return mask


def visual_count(keep, signal: SequenceSignal, b: int) -> int:
    """Visual tokens sample b keeps: ``keep`` (a count, a fraction, or a :class:`~tokred.Budget`
    measured on the sample's visual hidden states) resolved on its N visual tokens."""
    from tokred.reducers.budget import kept_counts

    return kept_counts(keep, signal.hidden[b, signal.visual[b]][None])[0]
