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


def keep_visual(signal: SequenceSignal, keep: int | float, choose: Callable[[int, int], Tensor]) -> Tensor:
    """(B, L) keep mask: every non-visual token, and per sample b with N visual tokens the
    positions ``choose(b, k)`` returns, k = ``kept_count(keep, N)``."""
    from tokred.reducers.base import kept_count

    mask = ~signal.visual
    for b, num_visual in enumerate(signal.visual.sum(dim=1).tolist()):
        if num_visual:
            mask[b, choose(b, kept_count(keep, num_visual))] = True
    return mask
