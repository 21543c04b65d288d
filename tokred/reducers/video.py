"""Video baselines at the ``projector`` stage, frame by frame: VisionZip per frame, DyCoke's
temporal token merging (TTM) and uniform per-frame keep (random per-frame keep is
``Random(stage="projector", per_frame=True)``).

Each acts on one visual item's tokens laid out by its :class:`~tokred.signals.Layout`
``(frames, height, width)``: frame f holds tokens ``f * n .. (f + 1) * n - 1`` (n = height x width).
An item without a layout is one frame of all its tokens; an image is a one-frame video. Protected
tokens (the newline after a LLaVA-OneVision video) never reach a reducer. The rules are pure
functions (:func:`visionzip_frame`: a plan per frame; :func:`dycoke_ttm`: the kept indices of a
video; :func:`uniform_keep`: a plan over a video); ties always go to the lower token index, and
nothing draws from a global generator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tokred.plan import Plan
from tokred.reducers.base import Reducer, check_finite, check_keep, check_positions, kept_count
from tokred.signals import Layout


def frames_of(layout: Layout | None, num_tokens: int) -> tuple[int, int]:
    """(frames, tokens per frame) of an item of ``num_tokens`` tokens: its layout's, or one frame
    of every token when it has none."""
    if layout is None:
        return 1, num_tokens
    if layout.num_tokens != num_tokens:
        raise ValueError(f"the layout {layout} holds {layout.num_tokens} tokens, but the item has {num_tokens}")
    return layout.frames, layout.height * layout.width


def _unit(features: Tensor) -> Tensor:
    """Unit-length tokens, in at least float32 (half-precision cosines would flip near-ties)."""
    return F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=-1)


def _count(value: int | float, available: int, name: str) -> int:
    """Tokens per frame for a count or a fraction (round(value x available), may be 0)."""
    if isinstance(value, int):
        if value > available:
            raise ValueError(f"{name}={value} tokens per frame, but a frame has only {available}")
        return value
    return round(value * available)


def _check_count(name: str, value, zero: bool = True) -> None:
    """An int count >= 0 (>= 1 unless ``zero``) or a fraction in [0, 1] ((0, 1] unless ``zero``)."""
    low = 0 if zero else 1
    if isinstance(value, bool) or not (isinstance(value, int) and value >= low
                                       or isinstance(value, float) and (0 <= value <= 1 if zero else 0 < value <= 1)):
        raise ValueError(f"{name} must be a number of tokens per frame >= {low} (an int) or a fraction of a frame's "
                         f"tokens in {'[0, 1]' if zero else '(0, 1]'} (a float), got {value!r}")


# VisionZip --------------------------------------------------------------------------------------

def visionzip_frame(features: Tensor, received: Tensor, dominant: int, contextual: int) -> Plan:
    """VisionZip (Yang et al., CVPR 2025) on each of B frames of n tokens, ``features`` (B, n, C),
    ``received`` (B, n): the attention each token received in the vision tower.

    1. Dominant: the ``dominant`` tokens that received the most attention (ties: lower index).
    2. Contextual: of the R = n - dominant other tokens, in index order, the targets are those at
       ranks 0, s, 2s, ... (s = max(1, R // contextual)), the first ``contextual`` of them; every
       other remaining token merges into the target most cosine-similar to it in ``features``
       (ties: the lower target), and a target becomes the plain mean of itself and its members.

    Returns a merge plan over each frame's n tokens: the kept tokens (dominant and targets) in
    index order, the members merged into their target (``Plan.weighted_mean`` with unit sizes gives
    the plain mean).
    """
    batch, n, _ = features.shape
    if dominant + contextual > n or dominant < 0 or contextual < 0:
        raise ValueError(f"VisionZip keeps dominant + contextual = {dominant} + {contextual} tokens of a frame of {n}")
    check_finite("VisionZip", "the tower attention", received)
    order = received.argsort(dim=-1, descending=True, stable=True)  # stable: ties to the lower index
    is_dominant = torch.zeros(batch, n, dtype=torch.bool, device=features.device)
    is_dominant.scatter_(1, order[:, :dominant], True)
    rest = (~is_dominant).nonzero()[:, 1].view(batch, n - dominant)  # remaining tokens, in index order
    if contextual == 0:
        return Plan(keep=is_dominant.nonzero()[:, 1].view(batch, dominant), num_inputs=n)
    step = max(1, (n - dominant) // contextual)
    ranks = torch.arange(0, n - dominant, step, device=features.device)[:contextual]
    is_target = torch.zeros(n - dominant, dtype=torch.bool, device=features.device)
    is_target[ranks] = True
    targets, members = rest[:, is_target], rest[:, ~is_target]
    unit = _unit(features)
    similarity = torch.take_along_dim(unit, members[..., None], 1) @ torch.take_along_dim(
        unit, targets[..., None], 1).transpose(1, 2)
    choice = targets.gather(1, similarity.argmax(dim=-1))  # argmax: the first (lower) target among ties
    keep = (is_dominant | torch.zeros_like(is_dominant).scatter_(1, targets, True)).nonzero()[:, 1].view(batch, -1)
    output = torch.searchsorted(keep, choice)  # output position of each member's target
    return Plan(keep=keep, num_inputs=n, src=members, dst=output)


def _per_frame(plan: Plan, items: int, frames: int, n: int) -> Plan:
    """A plan over (items x frames) frames of n tokens each as a plan over the items' frames x n tokens."""
    def lay(index: Tensor, step: int) -> Tensor:
        offsets = torch.arange(frames, device=index.device)[None, :, None] * step
        return (index.view(items, frames, -1) + offsets).reshape(items, -1)

    if not plan.merges:
        return Plan(keep=lay(plan.keep, n), num_inputs=frames * n)
    return Plan(keep=lay(plan.keep, n), num_inputs=frames * n, src=lay(plan.src, n),
                dst=lay(plan.dst, plan.num_outputs))


@dataclass(frozen=True)
class VisionZip(Reducer):
    """VisionZip applied to every frame of a video (or an image, one frame) at the ``projector``
    stage: per frame, ``dominant`` tokens by the attention they received in the vision tower, and
    ``contextual`` tokens merged from the rest (:func:`visionzip_frame`).

    The tower attention is the mean attention each token received in the tower's last used layer
    (SigLIP has no class token), averaged over heads and queries and pooled like the features
    (LLaVA-OneVision videos: bilinear 2 x 2; Qwen2-VL images and videos: the mean over each 2 x 2
    merge unit); the adapter recomputes it from that layer's input without switching the tower to
    eager attention. Departures from the reference, which merges on the
    tower's keys and *adds* the target to its members' mean: tokred merges on the projected tokens
    the language model receives and takes the plain mean (``specs/holitom.md`` §6).

    Args:
        dominant: tokens kept per frame by attention: a count, or a fraction of the frame's tokens
            (round(dominant x n)).
        contextual: contextual tokens per frame (a count or a fraction; 0: the rest is dropped).
        positions: ``"renumber"``, ``"keep"`` or None (the model's default).
    """

    dominant: int | float = 54
    contextual: int | float = 10
    positions: str | None = None

    stage = "projector"
    needs_tower_attention = True

    def __post_init__(self):
        _check_count("dominant", self.dominant)
        _check_count("contextual", self.contextual)
        if self.dominant == 0 and self.contextual == 0:
            raise ValueError("VisionZip with dominant=0 and contextual=0 would remove every token")
        check_positions(self.positions)

    def plan_images(self, features: Tensor, layout: Layout | None, received: Tensor | None = None) -> Plan:
        if received is None:
            raise ValueError("VisionZip needs the attention every token received in the vision tower")
        items, num_tokens, channels = features.shape
        frames, n = frames_of(layout, num_tokens)
        dominant, contextual = _count(self.dominant, n, "dominant"), _count(self.contextual, n, "contextual")
        if dominant + contextual > n or dominant + contextual == 0:
            raise ValueError(f"VisionZip keeps dominant + contextual = {dominant} + {contextual} tokens per frame; a "
                             f"frame has {n}: allowed 1..{n}")
        plan = visionzip_frame(features.reshape(items * frames, n, channels), received.reshape(items * frames, n),
                               dominant, contextual)
        return _per_frame(plan, items, frames, n)

    def overhead_flops(self, features: Tensor, layout: Layout | None = None) -> int:
        """Each frame's members x targets similarity, 2 (R - t) t C FLOPs with R = n - dominant
        and t = min(contextual, R) targets; the tower attention is counted by the adapter
        (``projector`` stage, ``tower_attention``)."""
        items, num_tokens, channels = features.shape
        frames, n = frames_of(layout, num_tokens)
        rest = n - _count(self.dominant, n, "dominant")
        targets = min(_count(self.contextual, n, "contextual"), rest)
        return items * frames * 2 * (rest - targets) * targets * channels


# DyCoke's TTM -------------------------------------------------------------------------------------

def dycoke_ttm(features: Tensor, frames: int, keep: float, window: int = 4) -> Tensor:
    """DyCoke's temporal token merging (Tao et al., CVPR 2025) on B videos ``features`` (B, F x n, C),
    frame by frame: indices (B, M), ascending, of the tokens kept.

    Frames form windows of ``window`` (4) frames; the first frame of a window is kept whole. Every
    later frame f keeps the floor(keep x n) tokens least cosine-similar to the token at the same
    position in its reference frame (ties: lower index), dropping the rest (they are "merged" into
    the reference frame, which already holds them): with window 4 the references are, for frames
    w+1, w+2, w+3 of a window starting at w, the frames w, w and w+2 (all on the unpruned features,
    as in the reference code). A last, partial window follows the same rule for the frames it has.

    Departures from the reference code: it returns each frame's kept tokens in similarity order
    (tokred: position order), drops an odd last frame entirely and leaves the last window's third
    frame unpruned (its loops stop early); tokred applies the rule to every frame.
    """
    batch, total, _ = features.shape
    n = total // frames
    count = math.floor(keep * n)
    unit = _unit(features).view(batch, frames, n, -1)
    kept = [torch.arange(total, device=features.device).view(frames, n)[f].expand(batch, -1)
            for f in range(0, frames, window)]
    for f in range(frames):
        offset = f % window
        if offset == 0:
            continue
        reference = f - 1 if offset % 2 else f - 2  # w+1 -> w, w+2 -> w, w+3 -> w+2 (and so on for longer windows)
        similarity = (unit[:, f] * unit[:, reference]).sum(dim=-1)  # (B, n)
        chosen = similarity.argsort(dim=-1, stable=True)[:, :count]  # least similar; ties to the lower index
        kept.append(chosen + f * n)
    return torch.cat(kept, dim=1).sort(dim=1).values


@dataclass(frozen=True)
class DyCoke(Reducer):
    """DyCoke's temporal token merging (TTM, :func:`dycoke_ttm`) at the ``projector`` stage: in
    windows of ``window`` frames, later frames keep only their ``keep`` least-similar same-position
    tokens. DyCoke's second stage (dynamic KV-cache pruning while decoding) is not included.

    Args:
        keep: the fraction of a later frame's tokens kept (floor(keep x n), as the reference), in [0, 1];
            DyCoke's default is 0.3.
        window: frames per window (4, DyCoke's); 1 keeps everything.
        positions: ``"renumber"``, ``"keep"`` or None (the model's default).
    """

    keep: float = 0.3
    window: int = 4
    positions: str | None = None

    stage = "projector"

    def __post_init__(self):
        if isinstance(self.keep, bool) or not isinstance(self.keep, float) or not 0 <= self.keep <= 1:
            raise ValueError(f"keep must be the fraction of a later frame's tokens kept, a float in [0, 1], "
                             f"got {self.keep!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an int >= 1 (frames per window; DyCoke uses 4), got {self.window!r}")
        check_positions(self.positions)

    def plan_images(self, features: Tensor, layout: Layout | None) -> Plan:
        check_finite("DyCoke", "the visual features", features)
        frames, _ = frames_of(layout, features.shape[1])
        return Plan(keep=dycoke_ttm(features, frames, self.keep, self.window), num_inputs=features.shape[1])


# uniform and random per-frame keep ------------------------------------------------------------------

def uniform_keep(frames: int, n: int, k: int, batch: int, device=None) -> Plan:
    """Keep plan: in every frame of n tokens, the k tokens at in-frame indices floor(i x n / k),
    i = 0..k-1 (evenly spaced in raster order, starting at the first), for ``batch`` items."""
    within = torch.div(torch.arange(k, device=device) * n, k, rounding_mode="floor")
    keep = (torch.arange(frames, device=device)[:, None] * n + within).flatten()
    return Plan(keep=keep.expand(batch, -1), num_inputs=frames * n)


@dataclass(frozen=True)
class Uniform(Reducer):
    """Uniform per-frame keep at the ``projector`` stage: every frame (an image: one frame) keeps
    ``keep`` of its tokens, evenly spaced in raster order (:func:`uniform_keep`).

    Args:
        keep: tokens kept per frame: a fraction in (0, 1] (round(keep x n), at least 1) or a count.
        positions: ``"renumber"``, ``"keep"`` or None (the model's default).
    """

    keep: int | float = 0.25
    positions: str | None = None

    stage = "projector"

    def __post_init__(self):
        check_keep(self.keep)
        if not isinstance(self.keep, (int, float)):
            raise ValueError(f"Uniform keeps a fraction (a float) or a count (an int) of every frame's tokens, got "
                             f"{self.keep!r}")
        check_positions(self.positions)

    def plan_images(self, features: Tensor, layout: Layout | None) -> Plan:
        frames, n = frames_of(layout, features.shape[1])
        return uniform_keep(frames, n, kept_count(self.keep, n), features.shape[0], features.device)
