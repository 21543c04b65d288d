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
        visual: (B, L) True for visual tokens (the only tokens a reducer may remove); an item's
            protected tokens (LLaVA-OneVision's video newline) only for a reducer that ``counts_protected``.
        valid: (B, L) True for real tokens, False for padding.
        prompt: (B, L) True for the tokens reducers may base decisions on: the prompt, not
            tokens generated after it (so a re-run without a cache decides exactly as the cached run).
        keys: (B, H_kv, L, D) keys of decoder layer K - 1 as the attention used them (after the
            rotary embedding), when the reducer ``needs_keys``.
        last_attention: (B, L) attention the last prompt token gives every token at layer K - 1,
            averaged over heads, when the reducer ``needs_last_attention``.
        sizes: (B, L, 1) input tokens each token stands for, once an earlier plan merged tokens, else None.
        layer: the decoder layer K the plan acts before.
        attention: (B, L, L) attention every token (row, the query) gives every token at layer K - 1,
            averaged over heads (causal, padding keys 0; padding query rows mean nothing), when the reducer
            ``needs_attention``.
        residual: (B, L, C) the same hidden states before the final norm: the residual stream entering
            layer K (HoliTom's inner stage compares these).
    """

    hidden: Tensor
    visual: Tensor
    valid: Tensor
    prompt: Tensor
    keys: Tensor | None = None
    last_attention: Tensor | None = None
    sizes: Tensor | None = None
    layer: int | None = None
    attention: Tensor | None = None
    residual: Tensor | None = None


@dataclass
class Heads:
    """Per-head queries and keys of one attention call, for reducers that need more than keys."""

    q: Tensor  # (B, H, N, D), after any q/k normalisation
    k: Tensor  # (B, H, N, D)
    scale: float
    bias: Tensor | None  # the additive bias the attention used, (B, 1, 1, N)

    def mean_keys(self) -> Tensor:
        return self.k.mean(dim=1)

    def received(self, weights: Tensor | None = None, chunk: int = 256) -> Tensor:
        """(B, N) attention each token receives, averaged over heads and (``weights``-weighted) queries.

        Computed over chunks of queries from the logits and their log-sum-exp, so at most
        chunk x N logits per head exist at a time, never the full N x N attention matrix. Costs
        one extra QK^T (see :meth:`flops`).
        """
        batch, heads, num_tokens, _ = self.q.shape
        total = self.q.new_zeros(batch, heads, num_tokens)
        for start in range(0, num_tokens, chunk):
            logits = (self.q[:, :, start:start + chunk] * self.scale) @ self.k.transpose(-1, -2)
            if self.bias is not None:
                logits = logits + self.bias
            probs = (logits - logits.logsumexp(dim=-1, keepdim=True)).exp()
            if weights is not None:
                probs = probs * weights[:, None, start:start + chunk, None]
            total = total + probs.sum(dim=2)
        count = num_tokens if weights is None else weights.sum(dim=1)[:, None]
        return total.mean(dim=1) / count

    def flops(self) -> int:
        """FLOPs of :meth:`received`: one QK^T."""
        batch, heads, num_tokens, dim = self.q.shape
        return 2 * batch * heads * num_tokens * num_tokens * dim


@dataclass
class Signal:
    """What a vision-stage reducer may look at when it plans.

    Attributes:
        tokens: (B, N, C) hidden states at the hook point.
        keys: (B, N, D) attention keys averaged over heads (for reducers acting after attention).
        num_protected: leading tokens (class, distillation, registers) that must survive.
        grid: (rows, cols) of the patch tokens while they are still the full grid, else None.
        heads: per-head queries and keys, when the adapter provides them.
        sizes: (B, N, 1) token sizes once tokens were merged or padded (0 marks padding), else None.
    """

    tokens: Tensor
    keys: Tensor | None
    num_protected: int
    grid: tuple[int, int] | None
    heads: Heads | None = None
    sizes: Tensor | None = None


@dataclass(frozen=True)
class Layout:
    """How the N tokens of one visual item lie, for projector-stage reducers: ``frames`` x
    ``height`` x ``width`` in raster order, frame by frame (an image has one frame; a video one
    per frame — LLaVA-OneVision: its pooled frames, Qwen2-VL: its temporal patches; Qwen2-VL's
    tokens are its 2 x 2 merge units). An item's protected tokens (the ``image_newline`` after a
    OneVision video) are not part of its layout: projector reducers never see them. Items whose
    tokens form no such grid (LLaVA-NeXT's AnyRes crops with newline tokens) have no layout (None)."""

    frames: int
    height: int
    width: int

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width
