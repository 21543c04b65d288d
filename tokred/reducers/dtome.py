"""DToMe: dynamic token merging (DyMU, Wang et al., "DyMU: Dynamic Merging and Virtual Unmerging for
Efficient VLMs", NeurIPS 2025) and its threshold calibration.

In every block, after attention and before the MLP, ToMe's bipartite matching on the keys averaged
over heads (A = even, B = odd positions among the image's live tokens; protected tokens never merge),
but instead of a fixed r, **every** A token whose best cosine match exceeds the block's threshold
tau_l merges into it (size-weighted; proportional attention on). Each image keeps its own number
of tokens; a batch is padded and masked. Between blocks the output has ToMe's order — protected
tokens, unmerged A tokens in order, then all B tokens — because the next block's A/B split is taken
on that order.

The thresholds come from :func:`calibrate_dtome`: DyMU's batch-level calibration, in which each
block merges the r_l * B most similar edges pooled over a batch of B images and records the
largest score it did not merge; tau_l is the mean of that statistic over the calibration batches,
so that an image removes about r_l tokens in block l on average, simple images more, busy ones
fewer.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from tokred.plan import Plan
from tokred.reducers.base import Reducer, check_flag, per_block
from tokred.schedule import per_layer

if TYPE_CHECKING:
    from tokred.signals import Signal


def best_matches(metric: Tensor, num_protected: int,
                 sizes: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ToMe's bipartite best matches over each image's live tokens.

    Args:
        metric: (B, N, D) per-token features (keys averaged over heads).
        num_protected: leading tokens that never merge.
        sizes: (B, N, 1) token sizes, 0 for padding (dead) tokens; None: every token is live.

    Returns (alive, is_a, best, match), each (B, N): live tokens; A tokens (the unprotected live
    tokens at even rank among the live ones); for A tokens the cosine similarity of their most
    similar B token (odd rank), clamped to [-1, 1], and -inf for every other token; the index of
    that B token (ties to the lower position).
    """
    batch, num_tokens, _ = metric.shape
    alive = sizes[..., 0] > 0 if sizes is not None else torch.ones(batch, num_tokens, dtype=torch.bool,
                                                                     device=metric.device)
    rank = alive.long().cumsum(dim=1) - 1
    candidate = alive & (rank >= num_protected)
    is_a, is_b = candidate & (rank % 2 == 0), candidate & (rank % 2 == 1)
    unit = F.normalize(metric, dim=-1)
    scores = (unit @ unit.transpose(-1, -2)).clamp(-1.0, 1.0)
    scores = scores.masked_fill(~(is_a[:, :, None] & is_b[:, None, :]), -math.inf)
    best, match = scores.max(dim=-1)
    return alive, is_a, best, match


def similarity_flops(signal: Signal) -> int:
    """FLOPs of :func:`best_matches`: the N x N cosine-similarity matmul of every image (it runs on
    the padded width, so a batch's cost does not depend on which tokens are live)."""
    batch, num_tokens, dim = signal.keys.shape
    return 2 * batch * num_tokens * num_tokens * dim


def tome_order_plan(merged: Tensor, match: Tensor, alive: Tensor, num_protected: int) -> Plan:
    """Merge plan: every token where ``merged`` (B, N) merges into ``match``; the output of each image is
    its protected tokens, its unmerged A tokens (even live rank), then its B tokens (odd live rank), each
    in order; an image that merges nothing keeps its order (ToMe with r = 0 does nothing), so a batch
    gives what each image alone gives. Images with fewer survivors are padded at the end (``Plan.padded``)."""
    batch, num_tokens = alive.shape
    positions = torch.arange(num_tokens, device=alive.device).expand(batch, -1)
    rank = alive.long().cumsum(dim=1) - 1
    survives = alive & ~merged
    group = torch.where(rank < num_protected, 0, torch.where(rank % 2 == 0, 1, 2))
    group = torch.where(merged.any(dim=1, keepdim=True), group, 0)
    key = torch.where(survives, group * num_tokens + positions, 3 * num_tokens + positions)
    order = key.argsort(dim=1)
    counts = survives.sum(dim=1)
    width = int(counts.max()) if batch else 0
    slot = torch.arange(width, device=alive.device)
    keep = torch.where(slot[None] < counts[:, None], order[:, :width], num_tokens)
    output = torch.empty_like(order).scatter_(1, order, positions)  # output slot of every input token
    merge_counts = merged.sum(dim=1)
    most = int(merge_counts.max()) if batch else 0
    src = torch.where(merged, positions, num_tokens).sort(dim=1).values[:, :most]
    dst = output.gather(1, match.gather(1, src.clamp(max=num_tokens - 1)).clamp(min=0))
    dst = torch.where(src < num_tokens, dst, 0)  # padding sources add nothing (size 0) to slot 0
    padded = bool((keep == num_tokens).any() or (src == num_tokens).any())
    return Plan(keep=keep, num_inputs=num_tokens, src=src, dst=dst, padded=padded)


def dtome_plan(metric: Tensor, threshold: float, num_protected: int = 0, sizes: Tensor | None = None) -> Plan:
    """DToMe's rule for one block, as a pure function: every A token whose best match is more
    cosine-similar than ``threshold`` merges into it (see :func:`best_matches` for A, B and ties,
    :func:`tome_order_plan` for the output order). ``threshold >= 1`` never merges."""
    alive, _, best, match = best_matches(metric, num_protected, sizes)
    return tome_order_plan(best > threshold, match, alive, num_protected)


def batch_merge_statistic(best: Tensor, r: int) -> tuple[Tensor, float]:
    """DyMU's calibration step for one block: pool the best-match scores of all A tokens of the
    batch (``best``: (B, N), -inf elsewhere), merge the r * B highest (a stable sort: ties to the
    earlier image and position), and return the merge mask and the statistic t = the largest score
    not merged (the one at rank r * B, or the last one if there are fewer edges), clamped at 0."""
    flat = best.reshape(-1)
    edges = int(torch.isfinite(flat).sum())
    merged = torch.zeros_like(flat, dtype=torch.bool)
    if edges == 0:
        return merged.view_as(best), 0.0
    order = torch.sort(flat, descending=True, stable=True).indices[:edges]
    count = min(r * best.shape[0], edges)
    merged[order[:count]] = True
    statistic = float(flat[order[min(count, edges - 1)]])
    return merged.view_as(best), max(statistic, 0.0)


@dataclass(frozen=True)
class DToMe(Reducer):
    """DyMU's dynamic token merging in the vision encoder (see the module docstring).

    Args:
        thresholds: similarity threshold per block (one float for every block, or one per block);
            a block with a threshold >= 1 (e.g. ``inf``) never merges. :func:`calibrate_dtome` finds them.
        prop_attn: proportional attention, adding log(token size) to the attention logits.
    """

    thresholds: float | Sequence[float] = math.inf
    prop_attn: bool = True

    stage = "vision"
    decides_per_token = True

    def __post_init__(self):
        values = list(self.thresholds) if isinstance(self.thresholds, Sequence) else [self.thresholds]
        if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) for v in values):
            raise ValueError(f"thresholds must be numbers (one, or one per block; inf never merges), got "
                             f"{self.thresholds!r}")
        check_flag("prop_attn", self.prop_attn)

    def check(self, num_layers: int) -> None:
        per_block(self.thresholds, num_layers, "DToMe")

    def threshold_at(self, layer: int, num_layers: int) -> float:
        return per_block(self.thresholds, num_layers, "DToMe")[layer]

    def removes(self, layer: int, num_layers: int, signal: Signal) -> int:
        if self.threshold_at(layer, num_layers) >= 1.0:  # cosines are clamped to 1: nothing can merge
            return 0
        return signal.tokens.shape[1] - signal.num_protected  # an upper bound: decided per token

    def plan(self, layer: int, num_layers: int, signal: Signal) -> Plan:
        return dtome_plan(signal.keys, self.threshold_at(layer, num_layers), signal.num_protected, signal.sizes)

    def overhead_flops(self, signal: Signal) -> int:
        return similarity_flops(signal)


class _BatchLevelMerging(Reducer):
    """DyMU's calibration mode: each block merges the r_l * B most similar edges of the batch and
    records the statistic of :func:`batch_merge_statistic` (one list per block)."""

    stage = "vision"
    decides_per_token = True

    def __init__(self, r, prop_attn: bool):
        self.r, self.prop_attn = r, prop_attn
        self.schedule: list[int] = []
        self.statistics: list[list[float]] = []

    def check(self, num_layers: int) -> None:
        """Expands the r schedule once the adapter knows the depth."""
        self.schedule = per_layer(self.r, num_layers)
        if any(v < 0 for v in self.schedule):
            raise ValueError(f"r must be >= 0 in every block, got {self.schedule}")
        self.statistics = [[] for _ in self.schedule]

    def removes(self, layer: int, num_layers: int, signal: Signal) -> int:
        return signal.tokens.shape[1] - signal.num_protected if self.schedule[layer] else 0

    def plan(self, layer: int, num_layers: int, signal: Signal) -> Plan:
        alive, _, best, match = best_matches(signal.keys, signal.num_protected, signal.sizes)
        merged, statistic = batch_merge_statistic(best, self.schedule[layer])
        self.statistics[layer].append(statistic)
        return tome_order_plan(merged, match, alive, signal.num_protected)

    def overhead_flops(self, signal: Signal) -> int:
        return similarity_flops(signal)


#: DyMU's r schedules, as ToMe (r, inflection) ramps: constant, increasing and decreasing with depth
SCHEDULES = {"constant": 0.0, "linear": 1.0, "reverse_linear": -1.0}


@torch.no_grad()
def calibrate_dtome(model, images, r: int | list[int], schedule: str = "constant", forward=None,
                    prop_attn: bool = True, progress: bool = True) -> DToMe:
    """DyMU's threshold calibration: a :class:`DToMe` whose blocks remove about r_l tokens per image
    on average on images like ``images``.

    Args:
        model: a vision model tokred supports (it is left as it was).
        images: an iterable of batches (tensors, or (tensor, label) pairs) of unlabeled images; the
            calibration batches (B images each) should be large: the statistic pools over the batch.
        r: tokens to remove per block on average: an int (shaped by ``schedule``) or one per block.
        schedule: ``"constant"`` (r in every block), ``"linear"`` (0 rising to 2r) or
            ``"reverse_linear"`` (2r falling to 0), ToMe's (r, inflection) ramps with inflection 0, 1, -1.
        forward: ``forward(model, batch)`` for models not called as ``model(batch)``.

    Procedure (the reference's, with its bookkeeping fixed): each batch runs with batch-level merging
    (the r_l * B most similar edges of the whole batch merge in block l, so the batch continues
    padded into the next block); per block the statistic is the largest score not merged, clamped at
    0; tau_l is its exact mean over the batches (float64; the reference replaces its initial value
    whenever it equals 1.0, keeps bf16 and sorts unstably). A block with r_l = 0 gets tau = inf.
    """
    from tqdm.auto import tqdm

    from tokred.api import applied

    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    calibration = _BatchLevelMerging(list(r) if isinstance(r, (list, tuple)) else (r, SCHEDULES[schedule]), prop_attn)
    batches = 0
    with applied(model, calibration):
        for batch in tqdm(images, desc="calibrating DToMe", disable=not progress):
            batch = batch[0] if isinstance(batch, (tuple, list)) else batch
            forward(model, batch) if forward is not None else model(batch)
            batches += 1
    if not batches:
        raise ValueError("calibrate_dtome needs at least one batch of images")
    thresholds = [math.inf if not r_l else float(torch.tensor(stats, dtype=torch.float64).mean())
                  for r_l, stats in zip(calibration.schedule, calibration.statistics)]
    return DToMe(thresholds=tuple(thresholds), prop_attn=prop_attn)
