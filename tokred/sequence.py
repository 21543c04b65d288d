"""What projector- and llm-stage reducers see: a batch of token sequences of a language model.

A vision-language model's sequence mixes text tokens and visual tokens. Reducers at the
``llm`` stage look at the hidden states entering decoder layer K (plus, if they ask, the keys
of layer K - 1 or the attention row of the last prompt token there) and say which visual
tokens stay; text is never removed. Sequences are left-padded; ``valid`` marks real tokens.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from tokred.plan import Plan


@dataclass
class SequenceSignal:
    """One batch of sequences at an ``llm``-stage hook point.

    Attributes:
        hidden: (B, L, C) hidden states entering decoder layer K, through the language model's
            final norm (as DART's reference compares them).
        visual: (B, L) True for visual tokens (the only tokens a reducer may remove).
        valid: (B, L) True for real tokens, False for padding.
        prompt: (B, L) True for the tokens reducers may base decisions on: the prompt, not
            tokens generated after it (so a re-run without a cache decides exactly as the cached run).
        keys: (B, H_kv, L, D) keys of decoder layer K - 1 as the attention used them (after the
            rotary embedding), when the reducer ``needs_keys``.
        last_attention: (B, L) attention the last prompt token gives every token at layer K - 1,
            averaged over heads, when the reducer ``needs_last_attention``.
    """

    hidden: Tensor
    visual: Tensor
    valid: Tensor
    prompt: Tensor
    keys: Tensor | None = None
    last_attention: Tensor | None = None


def keep_visual(signal: SequenceSignal, keep: int | float, choose: Callable[[int, int], Tensor]) -> Tensor:
    """(B, L) keep mask: every non-visual token, and per sample b with N visual tokens the
    positions ``choose(b, k)`` returns, k = ``kept_count(keep, N)``."""
    from tokred.reducers.base import kept_count

    mask = ~signal.visual
    for b, num_visual in enumerate(signal.visual.sum(dim=1).tolist()):
        if num_visual:
            mask[b, choose(b, kept_count(keep, num_visual))] = True
    return mask


def last_prompt_token(prompt: Tensor) -> Tensor:
    """(B,) index of the last True entry of each row of ``prompt`` (B, L)."""
    positions = torch.arange(prompt.shape[1], device=prompt.device)
    return torch.where(prompt, positions, -1).amax(dim=1)


def compaction(keep: Tensor) -> Plan:
    """Keep plan that drops the False entries of ``keep`` (B, L) and left-pads every row to the
    longest: padding entries point at L (``Plan.padded``: zero rows)."""
    batch, length = keep.shape
    counts = keep.sum(dim=1)
    width = int(counts.max()) if batch else 0
    # stable sort: kept tokens last, in order; the first width - count entries of a row are padding
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, length - width:]
    slot = torch.arange(width, device=keep.device)
    pad = slot[None, :] < (width - counts)[:, None]
    return Plan(keep=torch.where(pad, length, order), num_inputs=length, padded=bool(pad.any()))
