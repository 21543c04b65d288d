"""What reducers see: the signals an adapter hands them. A leaf module: it imports nothing of tokred."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


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
        sizes: (B, L, 1) input tokens each token stands for, once an earlier plan merged tokens, else None.
    """

    hidden: Tensor
    visual: Tensor
    valid: Tensor
    prompt: Tensor
    keys: Tensor | None = None
    last_attention: Tensor | None = None
    sizes: Tensor | None = None
