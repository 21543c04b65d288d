"""HoliTom (Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models",
NeurIPS 2025), restated from its Apache-2.0 reference code (``specs/holitom.md``) and written anew.

Two stages, two reducers, used together for the paper's method::

    tokred.apply(model, tokred.HoliTom(retain=0.10, tau=0.65), tokred.HoliTomInner(keep=0.5, layer=18))

- :class:`HoliTom` (``projector``, the outer stage) on each video's pooled, projected tokens
  X (F frames x N positions x C): per position, the cosine similarity of adjacent frames; a dynamic
  program cuts the frames into segments (:func:`segment_frames`); in each segment the positions
  similar across all its frames (the static set) become one token each (their temporal mean),
  clustered by DPC-KNN and merged with a beta weight (:func:`dpc_knn`, :func:`cluster_weights`); the
  other (dynamic) tokens keep, per frame, the top-k by the vision tower's mean received attention.
  Every group keeps its share of the budget ``retain`` (:func:`retention`). :func:`video_plan` is
  the whole rule for one video.
- :class:`HoliTomInner` (``llm``, the inner stage) before decoder layer K: keep the visual tokens the
  last prompt token attends to most at layer K - 1, merge every dropped one into its most similar
  kept token by repeated halving, keep the original positions (:func:`inner_merge`). Its visual span
  includes a LLaVA-OneVision video's ``image_newline``, as the reference's: the newline counts in
  m and may be dropped or merged like any visual token (the outer stage never sees it).

Departures from the reference, all on purpose: per sample in a batch (the reference assumes batch
size one); ties broken by index, never by the global random generator; similarities in float32.

Both stages merge with weights that are not token sizes (beta, 1 / w, repeated halving): their plans
carry them (``Plan.weight``). The outer stage's plan is ``Plan.ordered``: with renumbered positions
(LLaVA-OneVision's default) the language model sees its tokens in the spec's order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from tokred.plan import Plan, sequence_plan
from tokred.reducers.base import DecoderReducer, Reducer, check_finite, check_fraction, check_positions
from tokred.sequence import visual_count

if TYPE_CHECKING:
    from tokred.signals import Layout, SequenceSignal


def _check_number(name: str, value, low: float, high: float, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in {allowed}, got {value!r}")


def _check_count(name: str, value, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1 ({meaning}), got {value!r}")


# the outer stage: pure functions ------------------------------------------------------------------

def adjacent_similarity(features: Tensor) -> Tensor:
    """(F - 1, N) cosine similarity, in float32, of every position's token in frame f and frame f + 1,
    for the tokens ``features`` (F, N, C) of one video; clamped to [-1, 1] (rounding can exceed 1), so
    that tau = 1 counts no position as static."""
    unit = F.normalize(features.float(), dim=-1)
    return (unit[:-1] * unit[1:]).sum(dim=-1).clamp(-1, 1)


def segment_gains(static: Tensor) -> Tensor:
    """(F, F) int64 C[s, e]: tokens saved by collapsing each static position of frames s..e to one token.

    ``static`` (F - 1, N) is True where a position's frames f and f + 1 are similar (s[f, n] > tau).
    For s < e, C[s, e] = (e - s) * |{n : static[f, n] for every f in s..e-1}|, a chain condition on
    adjacent pairs; C is 0 on and below the diagonal. Vectorised through prefix counts of the
    non-static pairs: the chain holds iff no non-static pair lies in s..e-1.
    """
    frames = static.shape[0] + 1
    breaks = torch.cat([static.new_zeros(1, static.shape[1], dtype=torch.long), (~static).long().cumsum(0)])
    chained = (breaks[None, :, :] == breaks[:, None, :]).sum(dim=-1)  # (F, F): [s, e] static positions of s..e
    span = torch.arange(frames, device=static.device)
    length = span[None, :] - span[:, None]
    return torch.where(length > 0, length * chained, 0)


def segment_frames(static: Tensor, max_window: int = 1024) -> list[tuple[int, int]]:
    """HoliTom's temporal segmentation: the contiguous segments (start, end), inclusive, in time order.

    Args:
        static: (F - 1, N) True where s[f, n] > tau (see :func:`segment_gains`).
        max_window: the longest segment W, in frames.

    Rule: maximise the sum of C over the segments of a partition of frames 0..F-1 into segments of
    at most W frames, by dynamic programming: dp[-1] = 0, dp[i] = the best of dp[i-1] (frame i
    alone) and dp[i-w] + C(i-w+1, i) for w = 2..min(i+1, W), tried in that order; a candidate
    replaces the best only if strictly greater, so ties go to the singleton, then to the shortest
    window. Backtracked from frame F-1.
    """
    gain = segment_gains(static).tolist()
    frames = len(gain)
    best, start = [0] * (frames + 1), [0] * frames  # best[i + 1] = dp[i]
    for i in range(frames):
        value, first = best[i], i
        for w in range(2, min(i + 1, max_window) + 1):
            candidate = best[i - w + 1] + gain[i - w + 1][i]
            if candidate > value:
                value, first = candidate, i - w + 1
        best[i + 1], start[i] = value, first
    segments, end = [], frames - 1
    while end >= 0:
        segments.append((start[end], end))
        end = start[end] - 1
    return segments[::-1]


def retention(retain: float, total: int, saved: int) -> float:
    """r' = min(1, r / ((T - R) / T)): the share of every group's tokens to keep so that about
    ``retain`` (r) of the ``total`` T tokens remain once the temporal merge ``saved`` R of them.
    Evaluated in exactly this order: (T - R) / T first, then r divided by it (the reference's
    counts depend on it under the ceiling)."""
    return min(1.0, retain / ((total - saved) / total))


def dpc_knn(tokens: Tensor, clusters: int, neighbours: int = 7) -> tuple[Tensor, Tensor]:
    """DPC-KNN clustering of ``tokens`` (S, C): the centres (c,), ascending, and the cluster (S,) of
    every token (an index into the centres; a centre is in its own cluster).

    Rule: d_ij = ||y_i - y_j|| / sqrt(C) in float32, by ``torch.cdist`` in its default mode (above
    25 rows it uses a matrix product, so d_ii is then not exactly 0); density rho_i = exp(-mean of
    d_ij^2 over the k = min(neighbours, c) smallest d_ij of row i, i itself included); delta_i =
    the smallest d_ij to a denser token j, or the largest d of the whole matrix for the densest one;
    the centres are the c tokens with the largest rho * delta; every other token joins its nearest
    centre. Ties: among equal densities the lower index counts as denser, equal scores and equal
    distances go to the lower index (the reference breaks them with the global random generator).
    """
    num_tokens, channels = tokens.shape
    if isinstance(clusters, bool) or not isinstance(clusters, int) or not 1 <= clusters <= num_tokens:
        raise ValueError(f"clusters must be an int in [1, {num_tokens}] (the number of tokens), got {clusters!r}")
    y = tokens.float()
    distance = torch.cdist(y, y) / math.sqrt(channels)
    nearest = distance.topk(min(neighbours, clusters), dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    rank = torch.empty(num_tokens, dtype=torch.long, device=y.device)
    rank[torch.sort(density, descending=True, stable=True).indices] = torch.arange(num_tokens, device=y.device)
    denser = rank[None, :] < rank[:, None]  # [i, j]: j is denser than i
    delta = torch.where(denser, distance, distance.max()).amin(dim=-1)
    score = density * delta
    centres = torch.sort(score, descending=True, stable=True).indices[:clusters].sort().values
    cluster = distance[:, centres].argmin(dim=-1)
    cluster[centres] = torch.arange(clusters, device=y.device)
    return centres, cluster


def cluster_weights(centres: Tensor, cluster: Tensor, beta: float) -> Tensor:
    """(c, S) weights W such that W @ Y merges each cluster of tokens Y (S, C): a centre t with members
    M_t (its cluster without itself) becomes beta * y_t + (1 - beta) * mean(M_t), or y_t alone
    without members."""
    num_clusters = len(centres)
    member = F.one_hot(cluster, num_clusters).T.float()  # (c, S)
    member[torch.arange(num_clusters, device=cluster.device), centres] = 0
    count = member.sum(dim=1, keepdim=True)
    weights = (1 - beta) * member / count.clamp(min=1)
    own = torch.where(count[:, 0] > 0, beta, 1.0)
    weights[torch.arange(num_clusters, device=cluster.device), centres] = own
    return weights


def _top_k(score: Tensor, k: int) -> Tensor:
    """Indices of the k largest ``score`` entries (ties to the lower index), ascending."""
    return torch.sort(score, descending=True, stable=True).indices[:k].sort().values


@dataclass
class _Outputs:
    """Output tokens of one video being built: each a weighted sum of input tokens (flat indices)."""

    keep: list[int]
    src: list[Tensor]
    dst: list[Tensor]
    weight: list[Tensor]

    def add(self, index: Tensor, weights: Tensor) -> None:
        """Output tokens; ``index`` (M, J) input tokens and ``weights`` (M, J) their shares; column 0 is
        each output's own token; entries with index -1 are unused."""
        slots = torch.arange(len(self.keep), len(self.keep) + len(index), device=index.device)
        self.keep += index[:, 0].tolist()
        used = index[:, 1:] >= 0
        self.src.append(index[:, 1:][used])
        self.dst.append(slots[:, None].expand_as(used)[used])
        self.weight.append(weights[:, 1:][used])


def _clusters(tokens: Tensor, clusters: int, neighbours: int, beta: float) -> tuple[Tensor, Tensor]:
    """(c, S) member index of each DPC-KNN cluster of ``tokens`` (S, C), its centre first and -1 for
    unused entries, and the members' weights (:func:`cluster_weights`) in the same layout."""
    centres, cluster = dpc_knn(tokens, clusters, neighbours)
    weights = cluster_weights(centres, cluster, beta)
    rows = torch.arange(clusters, device=tokens.device)
    member = cluster[None, :] == rows[:, None]  # (c, S)
    member[rows, centres] = False
    width = int(member.sum(dim=1).max())
    others = torch.sort(member.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]
    index = torch.cat([centres[:, None], others], dim=1)
    used = torch.cat([torch.ones_like(index[:, :1], dtype=torch.bool), member.gather(1, others)], dim=1)
    return torch.where(used, index, -1), torch.where(used, weights.gather(1, index), 0)


def video_plan(features: Tensor, attention: Tensor, retain: float, tau: float, beta: float = 0.6,
               neighbours: int = 7, contextual: float = 0.0, max_window: int = 1024) -> tuple[Tensor, ...]:
    """HoliTom's outer stage on one video: (keep (M,), src (R,), dst (R,), weight (R,)) of a
    :class:`~tokred.plan.Plan` with merge weights over its F * N tokens (flat index f * N + n).

    Args:
        features: (F, N, C) the video's tokens, frame by frame (after the projector and pooling).
        attention: (F, N) attention each token received in the vision tower's last layer (mean over
            heads and queries), pooled like the features.
        retain: r, the share of the F * N tokens to keep (about; the ceilings overshoot a little).
        tau: similarity above which a position counts as static between adjacent frames.
        beta: weight of a cluster's centre in its merged token.
        neighbours: K of DPC-KNN (at most c neighbours are used).
        contextual: D, the share of each frame's dynamic budget spent on DPC-KNN clusters of the
            tokens top-k does not keep (0: they are dropped, the reference's default).
        max_window: the longest segment, in frames.

    Rule: segments from :func:`segment_frames` on s[f, n] > tau; R = the tokens they save;
    r' = :func:`retention`. In a segment of w >= 2 frames the static positions S (static in every
    adjacent pair of the segment) become one token each, the mean over its w frames at frame s;
    round(|S| r') of them survive as DPC-KNN clusters merged with ``beta`` (half to even; 0 drops the
    static region). Every frame's other L positions (all N in a singleton) keep ceil(L r') tokens:
    the top-k by attention (ties to the lower position) — with ``contextual`` D > 0 only
    round(ceil(L r') (1 - D)) of them, plus the rest of the budget as clusters of the tokens left.
    Output order: per segment, its static clusters (ascending position), then per frame its top-k
    tokens (ascending position), then its contextual clusters.
    """
    frames, positions = features.shape[:2]
    check_finite("HoliTom", "the video features (summed per token)", features.float().sum(dim=-1))
    check_finite("HoliTom", "the tower attention", attention)
    static = adjacent_similarity(features) > tau
    segments = segment_frames(static, max_window)
    gains = segment_gains(static)
    saved = sum(int(gains[s, e]) for s, e in segments)
    share = retention(retain, frames * positions, saved)
    out = _Outputs([], [], [], [])
    device = features.device
    for s, e in segments:
        width = e - s + 1
        still = static[s:e].all(dim=0) if width > 1 else torch.zeros(positions, dtype=torch.bool, device=device)
        still_at = still.nonzero().squeeze(1)
        clusters = round(len(still_at) * share)
        if clusters:
            means = features[s:e + 1, still_at].float().mean(dim=0)
            index, weights = _clusters(means, clusters, neighbours, beta)
            # each member stands for its position in all w frames, each frame 1/w of its share
            frame = torch.arange(s, e + 1, device=device)
            flat = torch.where(index[:, None, :] >= 0, frame[None, :, None] * positions + still_at[index][:, None, :],
                               -1)  # (c, w, J)
            out.add(flat.flatten(1), (weights[:, None, :] / width).expand_as(flat).flatten(1))
        moving = (~still).nonzero().squeeze(1)
        budget = math.ceil(len(moving) * share)
        dominant = round(budget * (1 - contextual)) if contextual else budget
        for f in range(s, e + 1):
            top = _top_k(attention[f, moving].float(), dominant)
            out.add((f * positions + moving[top])[:, None], torch.ones(len(top), 1, device=device))
            if budget > dominant:
                rest = torch.ones(len(moving), dtype=torch.bool, device=device)
                rest[top] = False
                rest_at = moving[rest]
                index, weights = _clusters(features[f, rest_at], budget - dominant, neighbours, beta)
                out.add(torch.where(index >= 0, f * positions + rest_at[index], -1), weights)
    empty = features.new_zeros(0, dtype=torch.long)
    keep = torch.tensor(out.keep, dtype=torch.long, device=device)
    return (keep, torch.cat(out.src) if out.src else empty, torch.cat(out.dst) if out.dst else empty,
            torch.cat(out.weight) if out.weight else features.new_zeros(0))


def batch_plan(plans: list[tuple[Tensor, ...]], num_inputs: int) -> Plan:
    """One left-aligned, ``ordered`` :class:`~tokred.plan.Plan` with merge weights for G items from their
    (keep, src, dst, weight): keep and src padded with ``num_inputs`` (``Plan.padded``), dst with 0 and
    weight with 0."""
    def stack(parts: list[Tensor], fill) -> Tensor:
        width = max(len(p) for p in parts)
        return torch.stack([torch.cat([p, p.new_full((width - len(p),), fill)]) for p in parts])

    keep, src, dst, weight = (stack([p[i] for p in plans], fill) for i, fill in enumerate((num_inputs, num_inputs,
                                                                                          0, 0.0)))
    padded = bool((keep == num_inputs).any() or (src == num_inputs).any())
    return Plan(keep=keep, num_inputs=num_inputs, src=src, dst=dst, padded=padded, weight=weight, ordered=True)


# the inner stage: pure function ------------------------------------------------------------------

def inner_merge(hidden: Tensor, attention: Tensor, visual: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """HoliTom's inner merge for one sample: (L,) the token each token merges into (-1: it stays) and
    (L,) its weight there (0 for tokens that stay).

    Args:
        hidden: (L, C) hidden states entering decoder layer K: the residual stream, before any norm.
        attention: (L,) attention the last prompt token gives every token at layer K - 1.
        visual: (L,) True for the visual tokens (the only candidates).
        k: visual tokens kept, 1 <= k <= visual.sum().

    Rule: keep the k visual tokens with the highest attention (ties to the lower position). Every
    dropped token j merges into the kept token t(j) most cosine-similar to it (float32; a tie goes to
    the kept token with more attention). The reference then walks the dropped tokens in ascending
    position and sets h_t <- (h_t + h_j) / 2 with the original h_j; in closed form, a kept token with
    sources j_1 < ... < j_m becomes 2^-m h_t + sum_i 2^-(m - i + 1) h_{j_i}: source j_i's weight is
    2^-(number of sources of t at or after j_i).
    """
    num_visual = int(visual.sum())
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_visual:
        raise ValueError(f"k must be an int in [1, {num_visual}] (the number of visual tokens), got {k!r}")
    check_finite("HoliTomInner", "the attention row", attention[visual])
    check_finite("HoliTomInner", "the hidden states", hidden[visual])
    length, device = hidden.shape[0], hidden.device
    merge_into = torch.full((length,), -1, dtype=torch.long, device=device)
    weight = torch.zeros(length, device=device)
    positions = visual.nonzero().squeeze(1)
    order = positions[torch.sort(attention[positions], descending=True, stable=True).indices]
    kept, dropped = order[:k], order[k:].sort().values
    if len(dropped) == 0:
        return merge_into, weight
    unit = F.normalize(hidden.float(), dim=-1)
    target = (unit[dropped] @ unit[kept].T).argmax(dim=-1)  # the first maximum: the most attended kept token
    counts = torch.bincount(target, minlength=k)
    # the rank of each source among its target's sources, counted from the last one (1 = the last)
    backwards = target.flip(0)
    grouped = torch.sort(backwards, stable=True).indices
    rank = torch.empty_like(target)
    rank[grouped] = torch.arange(len(target), device=device) - (counts.cumsum(0) - counts)[backwards[grouped]]
    merge_into[dropped] = kept[target]
    weight[dropped] = torch.exp2(-(rank.flip(0) + 1).float())
    return merge_into, weight


# the reducers ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HoliTom(Reducer):
    """HoliTom's outer stage at the ``projector`` stage: each video's tokens by :func:`video_plan`.

    Args:
        retain: r, the share of a video's tokens to keep, in (0, 1] (the reference's ``RETAIN_RATIO``;
            its scripts run 0.10, 0.15, 0.20 and 0.25).
        tau: similarity threshold of the static positions, in [-1, 1] (``T``; the scripts pair 0.65
            with retain 0.10 and use 0.80 otherwise). retain=1.0 with tau=1.0 keeps everything.
        beta: weight of a cluster's centre in its merged token, in [0, 1].
        neighbours: K of DPC-KNN, an int >= 1.
        contextual: D, the share of each frame's dynamic budget spent on clusters of the tokens top-k
            does not keep, in [0, 1) (0: those are dropped, as in the reference's runs).
        max_window: the longest segment in frames, an int >= 1 (1: no temporal merging).
        positions: position ids of the remaining tokens: ``"renumber"`` (contiguous, as the
            reference), ``"keep"``, or None (the model's default).

    Acts on visual items with a video layout (frames, height, width) and needs the vision tower's
    mean received attention of every token, which the adapter hands over (and counts). Its own FLOPs
    are reported as 0: the similarities are elementwise, and DPC-KNN's distance matrices (2 S^2 C per
    segment with S static positions, a matrix product only above 25 rows) depend on the data.
    """

    retain: float = 0.10
    tau: float = 0.65
    beta: float = 0.6
    neighbours: int = 7
    contextual: float = 0.0
    max_window: int = 1024
    positions: str | None = None

    stage: ClassVar[str] = "projector"
    needs_tower_attention: ClassVar[bool] = True

    def __post_init__(self):
        check_fraction("retain", self.retain)
        _check_number("tau", self.tau, -1, 1, "[-1, 1] (a cosine similarity)")
        _check_number("beta", self.beta, 0, 1, "[0, 1]")
        _check_count("neighbours", self.neighbours, "DPC-KNN's K")
        _check_number("contextual", self.contextual, 0, 1, "[0, 1)")
        if self.contextual == 1:
            raise ValueError("contextual must be a number in [0, 1), got 1 (no dominant tokens would be left)")
        _check_count("max_window", self.max_window, "the longest segment, in frames")
        check_positions(self.positions)

    def plan_images(self, features: Tensor, layout: Layout | None, received: Tensor | None = None) -> Plan:
        """Plan for G videos' tokens ``features`` (G, F * H * W, C), all of ``layout``, with the attention
        each token ``received`` (G, F * H * W) in the vision tower; each video planned on its own. An
        image is a video of one frame."""
        if received is None:
            raise ValueError("HoliTom needs the attention each visual token received in the vision tower "
                             "(received=...), got None")
        if layout is None or features.shape[1] != layout.num_tokens or received.shape != features.shape[:2]:
            raise ValueError(f"HoliTom needs each video's tokens as a (frames, height, width) grid and one attention "
                             f"value per token; got {tuple(features.shape)} tokens, attention "
                             f"{tuple(received.shape)}, layout {layout}")
        grid = (layout.frames, layout.height * layout.width)
        plans = [video_plan(x.view(*grid, -1), a.view(grid), self.retain, self.tau, self.beta, self.neighbours,
                            self.contextual, self.max_window) for x, a in zip(features, received)]
        return batch_plan(plans, layout.num_tokens)


@dataclass(frozen=True)
class HoliTomInner(DecoderReducer):
    """HoliTom's inner stage at the ``llm`` stage: before decoder layer ``layer``, each sample keeps
    its ``keep`` visual tokens that the last prompt token attends to most at layer ``layer - 1`` and
    merges the others into them by :func:`inner_merge`.

    Args:
        keep: visual tokens kept per sample: a fraction in (0, 1] (round(keep * N), half to even, at
            least 1; the reference's 1 - ``HOLITOM_r``), a count or a :class:`~tokred.Budget`.
        layer: the decoder layer K before which tokens merge (the reference's ``HOLITOM_k``, 18 of
            LLaVA-OneVision-7B's 28; a model with fewer layers needs a smaller K).
        positions: ``"keep"`` (original position ids with gaps, as the reference) or ``"renumber"``.

    Similarities and the merge both use the hidden states entering layer K, before any norm
    (``SequenceSignal.residual``), as the reference. The visual tokens include the ``image_newline``
    after a LLaVA-OneVision video (``counts_protected``), as the reference's span: a video of F
    frames of N tokens has F * N + 1, of which round(keep * (F * N + 1)) stay.
    """

    keep: int | float = 0.5
    layer: int = 18
    positions: str = "keep"

    needs_last_attention: ClassVar[bool] = True
    counts_protected: ClassVar[bool] = True

    def plan_sequence(self, signal: SequenceSignal) -> Plan:
        missing = [name for name in ("last_attention", "residual") if getattr(signal, name) is None]
        if missing:
            raise ValueError("HoliTomInner needs the last prompt token's attention row at decoder layer K - 1 "
                             "(SequenceSignal.last_attention) and the hidden states entering layer K before the "
                             f"norm (SequenceSignal.residual); got None for {' and '.join(missing)}")
        merge_into = torch.full(signal.visual.shape, -1, dtype=torch.long, device=signal.visual.device)
        weight = torch.zeros(signal.visual.shape, device=signal.visual.device)
        for b, num_visual in enumerate(signal.visual.sum(dim=1).tolist()):
            if num_visual:
                merge_into[b], weight[b] = inner_merge(signal.residual[b], signal.last_attention[b],
                                                       signal.visual[b], visual_count(self.keep, signal, b))
        return sequence_plan(signal.valid & (merge_into < 0), merge_into, weight)

    def overhead_flops(self, signal: SequenceSignal) -> int:
        """The cosine similarities of every dropped visual token to every kept one."""
        total = 0
        for b, num_visual in enumerate(signal.visual.sum(dim=1).tolist()):
            if num_visual:
                kept = visual_count(self.keep, signal, b)
                total += 2 * kept * (num_visual - kept) * signal.hidden.shape[-1]
        return total
