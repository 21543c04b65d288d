"""The model-agnostic half of every vision adapter: one forward's token bookkeeping and the
reduced transformer block.

An adapter supplies, per block, three callables — the attention branch (with an additive
attention bias, optionally returning the keys averaged over heads), the MLP branch and the
block's original forward — and :class:`VisionStage` runs the block with the reducer: before
the block for pruning baselines, between attention and MLP for merging.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from tokred.plan import Plan, follow
from tokred.reducers.base import Reducer, check_finite
from tokred.signals import Heads, Signal
from tokred.trace import LayerRecord, Trace

#: attend(x, bias, need_signal) -> (residual update, Heads or keys averaged over heads, or None)
Attend = Callable[[Tensor, Tensor | None, bool], tuple[Tensor, "Heads | Tensor | None"]]


def log_weights(weights: Tensor) -> Tensor:
    """log of token weights (sizes) for an additive attention mask: weight 0 gives a finite, hugely
    negative value (the token is invisible) whose gradient stays finite."""
    return weights.clamp_min(torch.finfo(weights.dtype).tiny).log()


def weight_bias(weights: Tensor, heads: int | None = None, queries: int = 1,
                dtype: torch.dtype | None = None) -> Tensor:
    """Additive attention mask giving every key token the log of its weight (B, N), so that a token
    of size s attends like s copies of itself (:func:`log_weights`: weight 0 hides it).

    Layout: (B, 1, 1, N), broadcast over heads and queries (SDPA, timm), or with ``heads`` the
    3-D (B * heads, ``queries``, N) that ``nn.MultiheadAttention`` wants (image-major). ``dtype``:
    cast after the log (the attention's dtype)."""
    bias = log_weights(weights)
    if dtype is not None:
        bias = bias.to(dtype)
    if heads is None:
        return bias[:, None, None, :]
    batch, num_tokens = bias.shape
    return bias[:, None, None, :].expand(batch, heads, queries, num_tokens).reshape(batch * heads, queries, num_tokens)


def weighted_mean(x: Tensor, size: Tensor | None, start: int) -> Tensor:
    """Mean of the tokens ``start:`` of ``x`` (B, N, C) weighted by ``size`` (B, N, 1); a plain mean
    when ``size`` is None (no token was merged or padded)."""
    if size is None:
        return x[:, start:].mean(dim=1)
    size = size[:, start:]
    return (x[:, start:] * size).sum(dim=1) / size.sum(dim=1)


class TokenRun:
    """Token bookkeeping of one forward: sizes, patch-to-token map and the trace."""

    def __init__(self, batch: int, num_prefix: int, grid: tuple[int, int] | None):
        self.trace = Trace(batch_size=batch, num_prefix=num_prefix, grid=grid)
        self.size: Tensor | None = None  # (B, N, 1), created by the first merge; 0 marks padding
        self.source_map: Tensor | None = None
        self.reduced = False
        self.padded = False

    def start(self, x: Tensor) -> None:
        batch, num_tokens = x.shape[:2]
        self.source_map = torch.arange(num_tokens, device=x.device).expand(batch, num_tokens)

    def attention_bias(self, proportional: bool) -> Tensor | None:
        """Additive attention mask (B, 1, 1, N): log(size) for proportional attention, and
        padding masked out (log 0); None when neither applies."""
        if self.size is None or not (proportional or self.padded):
            return None
        weights = self.size[..., 0] if proportional else (self.size[..., 0] > 0).to(self.size.dtype)
        return weight_bias(weights)

    def apply(self, plan: Plan, x: Tensor) -> Tensor:
        self.padded = self.padded or plan.padded
        if plan.merges or self.size is not None or plan.padded:
            size = self.size if self.size is not None else x.new_ones(*x.shape[:2], 1)
            x, self.size = plan.weighted_mean(x, size)
        else:
            x = plan.select(x)
        self.source_map = follow(self.source_map, plan)
        self.reduced = True
        return x

    def weighted_mean(self, x: Tensor, start: int) -> Tensor:
        """Mean of tokens ``start:`` weighted by size (a plain mean while no token was merged)."""
        return weighted_mean(x, self.size, start)


class VisionStage:
    """Runs the blocks of a vision encoder with one reducer, and keeps the last trace."""

    def __init__(self, reducer: Reducer | None, depth: int, num_prefix: int, stage: str = "vision"):
        self.reducer, self.depth, self.num_prefix, self.stage = reducer, depth, num_prefix, stage
        if reducer is not None:
            reducer.check(depth)
        self.run: TokenRun | None = None
        self.last_run: TokenRun | None = None
        #: set by :func:`tokred.calibrate` while thresholds are trained (soft decisions, no removal)
        self.calibration = None

    def begin(self, batch: int, grid: tuple[int, int] | None) -> None:
        self.run = TokenRun(batch, self.num_prefix, grid)

    def end(self) -> Trace:
        run = self.run
        run.trace.sizes = run.size[..., 0] if run.size is not None else None
        self.last_run, self.run = run, None
        return run.trace

    def abort(self) -> None:
        self.run = None

    @contextmanager
    def running(self, batch: int, grid: tuple[int, int] | None,
                on_end: Callable[[Trace], None] | None = None) -> Iterator[TokenRun]:
        """One forward of the encoder: :meth:`begin`, the ``with`` body (the blocks run through
        :meth:`block`), then :meth:`end`, whose trace goes to ``on_end``. If the body raises, the
        half-done run is dropped (:meth:`abort`: no trace, the previous one stays) and the error
        propagates."""
        self.begin(batch, grid)
        try:
            yield self.run
        except BaseException:
            self.abort()
            raise
        trace = self.end()
        if on_end is not None:
            on_end(trace)

    def _signal(self, x: Tensor, attention: Heads | Tensor | None) -> Signal:
        heads = attention if isinstance(attention, Heads) else None
        keys = heads.mean_keys() if heads is not None else attention
        return Signal(x, keys, self.num_prefix, None if self.run.reduced else self.run.trace.grid, heads,
                      self.run.size)

    def _check_finite(self, layer: int, signal: Signal) -> None:
        """A ``ValueError`` naming the reducer if the keys or queries it would rank tokens by hold NaN
        or infinity (reducers acting before the block, which look at no values, are not checked)."""
        name = type(self.reducer).__name__
        if signal.keys is not None:
            check_finite(name, f"the attention keys of {self.stage} block {layer}", signal.keys)
        if signal.heads is not None:
            check_finite(name, f"the attention queries of {self.stage} block {layer}", signal.heads.q)

    def _reduce(self, layer: int, x: Tensor, attention: Heads | Tensor | None, record: LayerRecord,
                requested: int) -> Tensor:
        run, reducer = self.run, self.reducer
        signal = self._signal(x, attention)
        self._check_finite(layer, signal)
        plan = reducer.plan(layer, self.depth, signal)
        removed = plan.num_inputs - plan.num_outputs
        if removed < requested and not reducer.decides_per_token:
            run.trace.notes.append(f"{self.stage} block {layer}: asked to remove {requested} tokens, capped at "
                                   f"{removed} (only {plan.num_inputs} tokens, {self.num_prefix} protected)")
        if not (removed or plan.merges or plan.padded):  # a padded plan changes images narrower than the widest
            return x
        if signal.keys is not None:
            record.reducer_flops += reducer.overhead_flops(signal)
        return run.apply(plan, x)

    def block(self, layer: int, x: Tensor, attend: Attend, feed_forward: Callable[[Tensor], Tensor],
              original: Callable[[Tensor], Tensor]) -> Tensor:
        """One block: ``x + attend(x)``, the reducer, ``x + feed_forward(x)``; ``original`` when nothing changes."""
        run, reducer = self.run, self.reducer
        if layer == 0 or run.source_map is None:
            run.start(x)
        if self.calibration is not None:
            return self.calibration.block(self, layer, x, attend, feed_forward)
        before = reducer is not None and reducer.where == "before_block"
        empty = x.shape[0] == 0  # a batch of no images: nothing to reduce, the model's own block runs
        requested = reducer.removes(layer, self.depth, self._signal(x, None)) if reducer is not None and not empty else 0
        record = LayerRecord(self.stage, layer, tokens_in=x.shape[1], tokens_attention=x.shape[1],
                             tokens_out=x.shape[1], requested=requested)
        if before and requested:
            x = self._reduce(layer, x, None, record, requested)
            record.tokens_attention = x.shape[1]
        during = requested if not before else 0
        bias = run.attention_bias(reducer is not None and reducer.proportional_attention)
        if not during and bias is None:
            x = original(x)
        else:
            update, attention = attend(x, bias, during > 0)
            x = x + update
            if during:
                x = self._reduce(layer, x, attention, record, requested)
            x = x + feed_forward(x)
        record.tokens_out = x.shape[1]
        if run.padded:
            record.tokens_per_image = (run.size[..., 0] > 0).sum(dim=1).tolist()
        run.trace.layers.append(record)
        run.trace.source_maps.append(run.source_map)
        return x
