"""DToMe: dynamic token merging (DyMU, Wang et al., "DyMU: Dynamic Merging and Virtual Unmerging for
Efficient VLMs", NeurIPS 2025) and its threshold calibration.

In every block, after attention and before the MLP, ToMe's bipartite matching on the keys averaged
over heads (A = even, B = odd positions among the image's live tokens; protected tokens never merge),
but instead of a fixed r, **every** A token whose best cosine match exceeds the block's threshold
tau_l merges into it (size-weighted; proportional attention on). Each image keeps its own number
of tokens; a batch is padded and masked. Between blocks the output has ToMe's order — protected
tokens, unmerged A tokens (by position after a class token, else by descending score), then all B
tokens — because the next block's A/B split is taken on that order.

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
from tokred.reducers.tome import a_output_order, descending_rank
from tokred.schedule import dymu_schedule, per_layer

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


def tome_order_plan(merged: Tensor, match: Tensor, alive: Tensor, best: Tensor, num_protected: int,
                    reorder_unmerged_images: bool = False) -> Plan:
    """Merge plan: every token where ``merged`` (B, N) merges into ``match``; the output of each image is
    its protected tokens, its unmerged A tokens (even live rank) in ToMe's order for best-match scores
    ``best`` (:func:`~tokred.reducers.tome.a_output_order`: by position with a protected token, else by
    descending score), then its B tokens (odd live rank) in order. An image that merges nothing keeps
    its order (ToMe with r = 0 does nothing, so a batch gives what each image alone gives), unless
    ``reorder_unmerged_images`` (DyMU's batch-level calibration lays out every image of the batch).
    Images with fewer survivors are padded at the end (``Plan.padded``)."""
    batch, num_tokens = alive.shape
    positions = torch.arange(num_tokens, device=alive.device).expand(batch, -1)
    rank = alive.long().cumsum(dim=1) - 1
    survives = alive & ~merged
    group = torch.where(rank < num_protected, 0, torch.where(rank % 2 == 0, 1, 2))
    if not reorder_unmerged_images:
        group = torch.where(merged.any(dim=1, keepdim=True), group, 0)
    within = torch.where(group == 1, a_output_order(best, num_protected), positions)
    key = torch.where(survives, group * num_tokens + within, 3 * num_tokens + positions)
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
    :func:`tome_order_plan` for the output order), at most ToMe's cap of (live - protected) // 2 per
    image, i.e. |A| - 1 for an odd number of live tokens and no protected token: the A tokens with the
    highest scores merge. ``threshold >= 1`` never merges."""
    alive, _, best, match = best_matches(metric, num_protected, sizes)
    cap = (alive.sum(dim=1, keepdim=True) - num_protected).clamp(min=0) // 2
    merged = (best > threshold) & (descending_rank(best) < cap)
    return tome_order_plan(merged, match, alive, best, num_protected)


def batch_merge_statistic(best: Tensor, r: int) -> tuple[Tensor, float]:
    """DyMU's calibration step for one block: pool the best-match scores of the batch (``best``: (B, N),
    A tokens at even positions, padding at the end, -inf for every token that is not an A token),
    merge the r * B highest (a stable sort: ties to the earlier image and position), and return the
    merge mask and the statistic t. As in the reference, t is read from all B * ceil(N / 2) rows of
    even positions, sorted descending, with the class row, padding and any other row that is not a
    real edge at -inf: t = the score at rank min(r * B, rows - 1), the largest one not merged, clamped
    at 0 (so t = 0 when every real edge merges and a -inf row is left)."""
    batch, num_tokens = best.shape
    flat = best.reshape(-1)
    merged = torch.zeros_like(flat, dtype=torch.bool)
    rows = batch * ((num_tokens + 1) // 2)
    if rows == 0:
        return merged.view_as(best), 0.0
    scores, order = torch.sort(flat, descending=True, stable=True)
    edges = int(torch.isfinite(flat).sum())
    merged[order[:min(r * batch, edges)]] = True
    statistic = float(scores[min(r * batch, rows - 1)])
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

    def __init__(self, r, schedule: str, prop_attn: bool):
        self.r, self.prop_attn, self.schedule_name = r, prop_attn, schedule
        self.schedule: list[int] = []
        self.statistics: list[list[float]] = []

    def check(self, num_layers: int) -> None:
        """Expands the r schedule once the adapter knows the depth."""
        if self.schedule_name == "constant" or isinstance(self.r, list):
            self.schedule = per_layer(self.r, num_layers)
        else:
            self.schedule = dymu_schedule(self.r, num_layers, reverse=self.schedule_name == "reverse_linear")
        if any(v < 0 for v in self.schedule):
            raise ValueError(f"r must be >= 0 in every block, got {self.schedule}")
        self.statistics = [[] for _ in self.schedule]

    def removes(self, layer: int, num_layers: int, signal: Signal) -> int:
        return signal.tokens.shape[1] - signal.num_protected if self.schedule[layer] else 0

    def plan(self, layer: int, num_layers: int, signal: Signal) -> Plan:
        alive, _, best, match = best_matches(signal.keys, signal.num_protected, signal.sizes)
        merged, statistic = batch_merge_statistic(best, self.schedule[layer])
        self.statistics[layer].append(statistic)
        return tome_order_plan(merged, match, alive, best, signal.num_protected, reorder_unmerged_images=True)

    def overhead_flops(self, signal: Signal) -> int:
        return similarity_flops(signal)


#: DyMU's r schedules (:func:`tokred.schedule.dymu_schedule` for the linear ones)
SCHEDULES = ("constant", "linear", "reverse_linear")


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
        schedule: for an int r, DyMU's schedules of r * L tokens over the L blocks: ``"constant"`` (r in
            every block), ``"linear"`` (most in the first block, decreasing: 12, 9, 3, 0 for r = 6 over
            4 blocks) or ``"reverse_linear"`` (the same reversed: 0, 3, 9, 12); see
            :func:`tokred.schedule.dymu_schedule`.
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
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    if isinstance(r, (list, tuple)) and schedule != "constant":
        raise ValueError(f"schedule={schedule!r} shapes an int r; r={r!r} already gives one r per block")
    calibration = _BatchLevelMerging(list(r) if isinstance(r, (list, tuple)) else r, schedule, prop_attn)
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
