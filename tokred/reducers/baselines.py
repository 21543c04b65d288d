"""Baselines users compare against: random pruning and spatial average pooling of the patch grid.

At the ``vision`` stage both act before one block (``layer``, default 0: right after the patch
embedding) and never touch the protected prefix tokens (class, registers). At the
``projector`` stage (``stage="projector"``) they act on each image's visual tokens before the
language model, and ``positions`` says how the language model numbers the remaining tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tokred.plan import Plan
from tokred.reducers.base import Reducer, check_flag, check_keep, check_positions, kept_count
from tokred.reducers.budget import Budget, kept_counts, padded_prefixes

if TYPE_CHECKING:
    from tokred.signals import Layout, Signal


#: the largest seed torch.Generator.manual_seed takes (an unsigned 64-bit integer)
MAX_SEED = 2**64 - 1


def _check_layer(layer) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be an int >= 0, got {layer!r}")


def _check_stage(stage, positions) -> None:
    if stage not in ("vision", "projector"):
        raise ValueError(f"stage must be 'vision' (inside the vision encoder) or 'projector' (on the visual "
                         f"tokens handed to a language model), got {stage!r}")
    check_positions(positions)


def _check_layer_fits(layer: int, num_layers: int) -> None:
    if layer >= num_layers:
        raise ValueError(f"layer={layer} but the model has only {num_layers} blocks (0..{num_layers - 1})")


def random_keep(num_tokens: int, keep: int | list[int], batch: int, num_protected: int = 0,
                generator: torch.Generator | None = None, device=None) -> Plan:
    """Keep plan: the protected prefix plus ``keep`` (one count, or one per image) uniformly random
    other tokens per image, in order; images keeping fewer than the most are padded (``Plan.padded``)."""
    scores = torch.rand(batch, num_tokens - num_protected, generator=generator, device=device)
    counts = keep if isinstance(keep, list) else [keep] * batch
    return padded_prefixes(scores.argsort(dim=-1) + num_protected, counts, num_tokens, num_protected)


def grid_pooling(grid: tuple[int, ...], stride: tuple[int, ...], batch: int, num_protected: int = 0,
                 device=None) -> Plan:
    """Merge plan that average-pools a raster-order (rows, cols) patch grid, or a (frames, rows,
    cols) video grid frame by frame, in windows of ``stride`` (same length as ``grid``).

    Windows at the edges (last frames, right, bottom) may be partial (ceil mode); each output
    token is the mean of its window's patches, in window raster order after the protected prefix.
    """
    if len(grid) == 2:
        grid, stride = (1, *grid), (1, *stride)
    frames, rows, cols = grid
    windows = [math.ceil(g / s) for g, s in zip(grid, stride)]
    f = torch.arange(frames, device=device)[:, None, None]
    r = torch.arange(rows, device=device)[None, :, None]
    c = torch.arange(cols, device=device)[None, None, :]
    window = (((f // stride[0]) * windows[1] + r // stride[1]) * windows[2] + c // stride[2]).flatten()
    first = ((f % stride[0] == 0) & (r % stride[1] == 0) & (c % stride[2] == 0)).flatten()
    patches = torch.arange(frames * rows * cols, device=device)
    keep = torch.cat([torch.arange(num_protected, device=device), num_protected + patches[first]])
    src = num_protected + patches[~first]
    dst = num_protected + window[~first]
    return Plan(keep=keep.expand(batch, -1), num_inputs=num_protected + frames * rows * cols,
                src=src.expand(batch, -1), dst=dst.expand(batch, -1))


@dataclass(frozen=True)
class Random(Reducer):
    """Random pruning: before block ``layer``, keep ``keep`` of the non-prefix tokens at random.

    Args:
        keep: non-prefix tokens kept: a fraction in (0, 1] (round(keep * N), at least 1), a count, or
            a :class:`~tokred.Budget` (each image its own fraction, from its content).
        layer: the block before which tokens are pruned (``vision`` stage).
        seed: seed of the generator (an int in [0, 2**64 - 1]), reset at every forward, so a forward is
            reproducible.
        stage: ``"vision"`` or ``"projector"`` (each image's visual tokens before the language model).
        positions: ``projector`` stage: ``"renumber"`` or ``"keep"`` the language model's position ids;
            None: the model's default (renumber for 1-D positions, keep for Qwen2-VL's M-RoPE).
        per_frame: ``projector`` stage: ``keep`` (a fraction or a count) applies to every frame of a
            video (its layout's frames; an image or an item without a layout is one frame) instead of
            the whole item.
    """

    keep: int | float = 0.5
    layer: int = 0
    seed: int = 0
    stage: str = "vision"
    positions: str | None = None
    per_frame: bool = False

    where = "before_block"

    def __post_init__(self):
        check_keep(self.keep)
        _check_layer(self.layer)
        _check_stage(self.stage, self.positions)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an int in [0, 2**64 - 1] (what torch.Generator.manual_seed takes), "
                             f"got {self.seed!r}")
        check_flag("per_frame", self.per_frame)
        if self.per_frame and (self.stage != "projector" or isinstance(self.keep, Budget)):
            raise ValueError("per_frame keeps a fraction or a count of tokens in every frame of a video, which only "
                             "the 'projector' stage sees: use stage='projector' and a float or int keep")

    def check(self, num_layers: int) -> None:
        _check_layer_fits(self.layer, num_layers)

    @property
    def decides_per_token(self) -> bool:
        """With a :class:`~tokred.Budget` each image keeps its own count (``removes`` is the most any image loses)."""
        return isinstance(self.keep, Budget)

    def kept(self, num_candidates: int) -> int:
        return kept_count(self.keep, num_candidates)

    def removes(self, layer: int, num_layers: int, signal: Signal) -> int:
        if layer != self.layer:
            return 0
        candidates = signal.tokens.shape[1] - signal.num_protected
        return candidates - min(kept_counts(self.keep, signal.tokens, signal.num_protected))

    def plan(self, layer: int, num_layers: int, signal: Signal) -> Plan:
        tokens: Tensor = signal.tokens
        generator = torch.Generator(device=tokens.device).manual_seed(self.seed)
        counts = kept_counts(self.keep, tokens, signal.num_protected)
        return random_keep(tokens.shape[1], counts, tokens.shape[0], signal.num_protected, generator, tokens.device)

    def plan_images(self, features: Tensor, layout: Layout | None) -> Plan:
        """Per item, or per frame with ``per_frame`` (each item's frames in turn, one generator)."""
        generator = torch.Generator(device=features.device).manual_seed(self.seed)
        images, num_tokens = features.shape[:2]
        if not self.per_frame:
            return random_keep(num_tokens, kept_counts(self.keep, features), images, 0, generator, features.device)
        from tokred.reducers.video import frames_of

        frames, n = frames_of(layout, num_tokens)
        chosen = random_keep(n, self.kept(n), images * frames, 0, generator, features.device).keep
        offsets = torch.arange(frames, device=features.device)[None, :, None] * n
        return Plan(keep=(chosen.view(images, frames, -1) + offsets).reshape(images, -1), num_inputs=num_tokens)


@dataclass(frozen=True)
class Pool(Reducer):
    """Spatial average pooling (downsampling) of the patch grid before block ``layer``.

    Args:
        stride: window size and step, an int or (rows, cols); 2 keeps about a quarter of the patches.
        layer: the block before which the grid is pooled (``vision`` stage; the grid must still be
            complete there).
        stage: ``"vision"`` or ``"projector"`` (each image's or video's visual tokens before the
            language model, when they still form the patch grid).
        positions: ``projector`` stage: ``"renumber"`` or ``"keep"`` the language model's position ids;
            None: the model's default (renumber for 1-D positions, keep for Qwen2-VL's M-RoPE).
        temporal_stride: ``projector`` stage, videos: frames per window as well (1: each frame is
            pooled on its own; 2 also averages pairs of consecutive frames, the last window partial
            when the frame count is odd). An image is one frame.
    """

    stride: int | tuple[int, int] = 2
    layer: int = 0
    stage: str = "vision"
    positions: str | None = None
    temporal_stride: int = 1

    where = "before_block"

    def __post_init__(self):
        strides = self.stride if isinstance(self.stride, tuple) and len(self.stride) == 2 else (self.stride,)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in strides):
            raise ValueError(f"stride must be an int >= 1 or a (rows, cols) pair of ints >= 1, got {self.stride!r}")
        t = self.temporal_stride
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ValueError(f"temporal_stride must be an int >= 1 (frames per pooling window), got {t!r}")
        if t > 1 and self.stage != "projector":
            raise ValueError("temporal_stride pools frames of a video, which only the 'projector' stage sees; "
                             "use stage='projector'")
        _check_layer(self.layer)
        _check_stage(self.stage, self.positions)

    @property
    def strides(self) -> tuple[int, int]:
        return self.stride if isinstance(self.stride, tuple) else (self.stride, self.stride)

    def check(self, num_layers: int) -> None:
        _check_layer_fits(self.layer, num_layers)

    def _grid(self, signal: Signal) -> tuple[int, int]:
        if signal.grid is None:
            raise ValueError("Pool needs the complete patch grid, but this model gave none or its tokens "
                             "were already reduced")
        rows, cols = signal.grid
        if rows * cols + signal.num_protected != signal.tokens.shape[1]:
            raise ValueError(f"Pool expected {signal.num_protected} prefix tokens and a {rows}x{cols} grid, "
                             f"got {signal.tokens.shape[1]} tokens")
        return rows, cols

    def removes(self, layer: int, num_layers: int, signal: Signal) -> int:
        if layer != self.layer:
            return 0
        rows, cols = self._grid(signal)
        return rows * cols - math.ceil(rows / self.strides[0]) * math.ceil(cols / self.strides[1])

    def plan(self, layer: int, num_layers: int, signal: Signal) -> Plan:
        return grid_pooling(self._grid(signal), self.strides, signal.tokens.shape[0], signal.num_protected,
                            signal.tokens.device)

    def plan_images(self, features: Tensor, layout: Layout | None) -> Plan:
        if layout is None or layout.num_tokens != features.shape[1]:
            raise ValueError(f"Pool at the projector stage needs each image's or video's visual tokens to be its full "
                             f"patch grid; these {features.shape[1]} tokens are not (layout: {layout}). Use Random "
                             "or DivPrune there instead")
        return grid_pooling((layout.frames, layout.height, layout.width), (self.temporal_stride, *self.strides),
                            features.shape[0], 0, features.device)


@dataclass(frozen=True)
class Matryoshka(Reducer):
    """M3's nested scales (Cai et al., "Matryoshka Multimodal Models", ICLR 2025): average-pool each
    image's projected visual tokens to ``tokens`` = s tokens, a square grid of side sqrt(s) whose side
    divides the image's grid (576, 144, 36, 9 or 1 for LLaVA-1.5's 24 x 24), in non-overlapping windows
    (kernel = stride = side / sqrt(s)), row-major — :class:`Pool` at the ``projector`` stage with that
    stride. Training-free it is a pooling baseline; on M3's fine-tuned weights (e.g.
    ``mucai/llava-v1.5-7b-m3``, loaded as a LLaVA-1.5 model) the same call reproduces M3.

    Args:
        tokens: visual tokens kept per image, a perfect square whose root divides the grid side.
        positions: ``"renumber"``, ``"keep"``, or None (the model's default).
    """

    tokens: int
    positions: str | None = None

    stage = "projector"

    def __post_init__(self):
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1 \
                or math.isqrt(self.tokens) ** 2 != self.tokens:
            raise ValueError(f"tokens must be a perfect square >= 1 (M3's scales: 576, 144, 36, 9, 1 on a 24 x 24 "
                             f"grid), got {self.tokens!r}")
        check_positions(self.positions)

    def plan_images(self, features: Tensor, layout: Layout | None) -> Plan:
        if layout is None or layout.frames != 1 or layout.height != layout.width \
                or layout.num_tokens != features.shape[1]:
            raise ValueError(f"Matryoshka needs each image's visual tokens to be a full square grid; these "
                             f"{features.shape[1]} tokens are not (layout: {layout})")
        side, root = layout.height, math.isqrt(self.tokens)
        if side % root:
            scales = [d * d for d in range(side, 0, -1) if side % d == 0]
            raise ValueError(f"Matryoshka(tokens={self.tokens}) on a {side} x {side} grid: the scales are the square "
                             f"divisors {scales}")
        stride = side // root
        return grid_pooling((side, side), (stride, stride), features.shape[0], 0, features.device)
