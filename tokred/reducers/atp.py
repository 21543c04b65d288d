"""ATP-style pruning inside the language model: a calibration-only, training-free form of ATP-LLaVA
(Ye et al., "ATP-LLaVA: Efficient and Adaptive Token Pruning for Large Vision Language Models",
CVPR 2025).

**Not ATP-LLaVA itself.** ATP-LLaVA trains a threshold module (an MLP on pooled statistics of each
instance) and fine-tunes the model with soft masks and a budget loss. tokred keeps its shape and
trains nothing: before each of a few decoder layers K (``layers``), per sample,

1. importance r_i of every visual token i from the attention of layer K - 1 (averaged over heads),
   each query row normalised by the live tokens it sees (multiplied by their count, so a uniform
   row gives 1: normalised by the live count, as :class:`~tokred.Thresholds` does):
   s_i = the mean over the visual queries j >= i (those that see i) of their attention to i,
   c_i = the mean over the prompt's text queries after the last visual token of their attention to i,
   r_i = (s_i + c_i) / 2, or s_i for a sample with no text after its image;
2. the visual token stays if r_i > theta_K (one threshold per layer for all samples: adaptivity
   comes from the per-instance scores, as in DToMe), or if it is one of every ``stride`` visual
   tokens still present, counted in sequence order from the first (the spatial branch, always
   kept: ATP-LLaVA's learned spatial rate amounts to a fixed stride per layer);
3. text is never pruned, and the survivors keep their original positions (ATP-LLaVA's choice).

The thresholds are fitted by :func:`calibrate_atp` (``tokred.calibrate(model, data,
reducer=ATP(...), target_flops=..., loss="kl_to_full")``): no labels, only the thresholds change.

The importance needs every query row of layer K - 1's attention, which SDPA does not return: the
engine recomputes that layer's queries and their attention over its cached keys (counted as the
reducer's FLOPs: one q projection and one QK^T per plan layer).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from tokred.reducers.base import Reducer, check_decoder_layer, check_finite, check_positions
from tokred.reducers.dart import text_after_image

if TYPE_CHECKING:
    from tokred.signals import SequenceSignal

#: the calibration losses :func:`calibrate_atp` knows
LOSSES = ("kl_to_full",)


def importance(attention: Tensor, visual: Tensor, valid: Tensor, text: Tensor) -> Tensor:
    """(B, L) ATP-style importance of every token (meaningful for visual tokens).

    Args:
        attention: (B, L, L) attention of every query (row) to every key, averaged over heads.
        visual: (B, L) True for the visual tokens (queries of s_i, and the tokens scored).
        valid: (B, L) True for real tokens; a query's row is multiplied by its live keys (causal count).
        text: (B, L) True for the text queries of c_i (the prompt's text after the image).
    """
    live = valid.to(attention.dtype).cumsum(dim=1)  # keys each query sees
    normalised = attention * live[:, :, None]
    queries = torch.arange(visual.shape[1], device=visual.device)
    sees = queries[:, None] >= queries[None, :]  # (query j, key i): j >= i
    from_visual = (visual & valid)[:, :, None] & sees[None]
    weight = from_visual.to(attention.dtype)
    s = (normalised * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1)
    t = text.to(attention.dtype)
    c = (normalised * t[:, :, None]).sum(dim=1) / t.sum(dim=1, keepdim=True).clamp_min(1)
    has_text = text.any(dim=1, keepdim=True)
    return torch.where(has_text, (s + c) / 2, s)


def keep_rule(scores: Tensor, visual: Tensor, threshold: float, stride: int) -> Tensor:
    """(B, L) True for the tokens that stay: every non-visual token, the visual tokens scoring above
    ``threshold``, and every ``stride``-th visual token (rank 0, stride, 2 stride, ... among the
    sample's visual tokens in sequence order)."""
    rank = visual.long().cumsum(dim=1) - 1
    return ~visual | (scores > threshold) | (rank % stride == 0)


def _per_layer(value, count: int, name: str) -> tuple:
    values = tuple(value) if isinstance(value, Sequence) else (value,) * count
    if len(values) != count:
        raise ValueError(f"{len(values)} ATP {name} given for {count} layers; give one per layer or a single value")
    return values


@dataclass(frozen=True)
class ATP(Reducer):
    """ATP-style pruning at several decoder layers (calibration-only; the rule:
    :mod:`tokred.reducers.atp`). Not ATP-LLaVA's trained module.

    Args:
        layers: the decoder layers K before which visual tokens are pruned, increasing, each >= 1
            and below the language model's depth (checked when applied).
        thresholds: one importance threshold per layer (or one for all); a visual token stays when
            its importance (1 = a uniform share of attention) is above it. -inf keeps every token
            (the model then runs unpatched); :func:`calibrate_atp` fits them.
        strides: per layer (or one for all), every ``stride``-th visual token is always kept (>= 1).
        positions: ``"keep"`` (the original positions, with gaps, as ATP-LLaVA) or ``"renumber"``.
    """

    layers: tuple[int, ...] = (2, 8, 16)
    thresholds: float | tuple[float, ...] = -math.inf
    strides: int | tuple[int, ...] = 8
    positions: str = "keep"

    stage: ClassVar[str] = "llm"
    needs_attention: ClassVar[bool] = True

    def __post_init__(self):
        layers = self.layers
        if not isinstance(layers, Sequence) or not layers:
            raise ValueError(f"layers must be a non-empty sequence of decoder layers, e.g. (2, 8, 16), got {layers!r}")
        for layer in layers:
            check_decoder_layer(layer)
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"layers must be increasing without repeats, got {layers!r}")
        for threshold in _per_layer(self.thresholds, len(layers), "thresholds"):
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
                raise ValueError(f"thresholds must be numbers (-inf keeps every token), got {self.thresholds!r}")
        for stride in _per_layer(self.strides, len(layers), "strides"):
            if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
                raise ValueError(f"strides must be ints >= 1 (every stride-th visual token is kept), got "
                                 f"{self.strides!r}")
        check_positions(self.positions)
        if self.positions is None:
            raise ValueError("ATP's positions must be 'keep' or 'renumber'")

    @property
    def keep(self) -> float | None:
        """1.0 when no threshold can prune (all -inf), so the model runs unpatched; else None (per token)."""
        return 1.0 if all(t == -math.inf for t in self.thresholds_list) else None

    @property
    def thresholds_list(self) -> tuple[float, ...]:
        return tuple(float(t) for t in _per_layer(self.thresholds, len(self.layers), "thresholds"))

    @property
    def strides_list(self) -> tuple[int, ...]:
        return _per_layer(self.strides, len(self.layers), "strides")

    def check(self, num_layers: int) -> None:
        if self.layers[-1] >= num_layers:
            raise ValueError(f"ATP layers={tuple(self.layers)}, but the language model has {num_layers} decoder "
                             f"layers; every layer K must be in 1..{num_layers - 1} (the attention comes from "
                             f"layer K - 1)")

    def decoder_layers(self) -> tuple[int, ...]:
        return tuple(self.layers)

    def scores(self, signal: SequenceSignal) -> Tensor:
        """(B, L) the importance of every token at this plan (:func:`importance`)."""
        if signal.attention is None:
            raise ValueError("ATP needs the attention rows of decoder layer K - 1 (SequenceSignal.attention), got None")
        scores = importance(signal.attention, signal.visual, signal.valid, text_after_image(signal))
        check_finite("ATP", "the attention-based importance", scores[signal.visual])
        return scores

    def keep_mask(self, signal: SequenceSignal) -> Tensor:
        index = self.layers.index(signal.layer)
        return keep_rule(self.scores(signal), signal.visual, self.thresholds_list[index], self.strides_list[index])


# calibration -----------------------------------------------------------------------------------------

class _Recorder(ATP):
    """ATP that also records, at its last layer, the importance of the visual tokens the threshold
    decides on (those the stride does not keep) and the visual and total tokens per sample."""

    records: ClassVar[list] = []

    @property
    def keep(self) -> None:
        return None  # records even when it prunes nothing

    def keep_mask(self, signal: SequenceSignal) -> Tensor:
        if signal.layer != self.layers[-1]:
            return super().keep_mask(signal)
        scores = self.scores(signal)
        strided = keep_rule(scores, signal.visual, math.inf, self.strides_list[-1]) & signal.visual
        _Recorder.records.append((scores[signal.visual & ~strided].double(), int(signal.visual.sum()),
                                  int(strided.sum()), signal.visual.sum(dim=1).tolist(),
                                  signal.valid.sum(dim=1).tolist()))
        return keep_rule(scores, signal.visual, self.thresholds_list[-1], self.strides_list[-1])


def _record(model, batches, forward, others, reducer: ATP, upto: int, thresholds: tuple[float, ...]) -> list:
    """Run the data with ``reducer``'s first ``upto`` layers (``thresholds`` before the last, which
    prunes nothing) and return what :class:`_Recorder` saw at the last one."""
    import tokred

    recorder = _Recorder(layers=reducer.layers[:upto], thresholds=thresholds + (-math.inf,),
                         strides=reducer.strides_list[:upto], positions=reducer.positions)
    _Recorder.records = []
    with torch.no_grad(), tokred.applied(model, *others, recorder):
        for batch in batches:
            forward(model, batch)
    return _Recorder.records


def _quantile_threshold(scores: Tensor, wanted: int) -> float:
    """The threshold that keeps the ``wanted`` highest of ``scores`` (ties aside): the next score down."""
    if wanted <= 0:
        return math.inf
    if wanted >= len(scores):
        return -math.inf
    return float(scores.sort(descending=True).values[wanted])


def _fit_thresholds(model, batches, forward, others, reducer: ATP, fractions: list[float]) -> tuple[float, ...]:
    """Layer by layer, the threshold keeping ``fractions[l]`` of the visual tokens entering layer l,
    pooled over the data, with the earlier layers' thresholds in place (DyMU's pooled statistic)."""
    thresholds: tuple[float, ...] = ()
    for index in range(len(reducer.layers)):
        records = _record(model, batches, forward, others, reducer, index + 1, thresholds)
        scores = torch.cat([r[0] for r in records])
        visual, strided = sum(r[1] for r in records), sum(r[2] for r in records)
        thresholds += (_quantile_threshold(scores, round(fractions[index] * visual) - strided),)
    return thresholds


def _llm_ratio(costs, overhead, reducer: ATP, fractions: list[float], counts) -> float:
    """Analytic LLM-prefill FLOPs ratio, per sample (padding aside), when the visual tokens entering
    each plan layer keep ``fractions`` (at least the stride's share); ``overhead[i](tokens)``: the
    reducer's own FLOPs before layer i."""
    layers = tuple(reducer.layers)
    full = reduced = 0.0
    for visual, total in zip(*counts):
        left = float(visual)
        for i, cost in enumerate(costs):
            if i in layers:
                reduced += overhead[i](total - visual + left)  # the attention rows, on the tokens before the plan
                index = layers.index(i)
                left = max(left * fractions[index], math.ceil(left / reducer.strides_list[index]))
            full += cost.flops(total, total)
            tokens = total - visual + left
            reduced += cost.flops(tokens, tokens)
    return reduced / full


def _attention_rows_flops(adapter, layer: int):
    """FLOPs of the engine's attention rows at ``layer`` for a sequence of n tokens: q projection and QK^T."""
    from tokred.flops import linear_flops

    attn = adapter.layers[layer].self_attn
    heads = adapter.language_model.config.num_attention_heads
    return lambda n: linear_flops(attn.q_proj, 1) * n + 2 * heads * n * n * attn.head_dim


def _shapes(count: int) -> dict[str, list[float]]:
    """How the pruning is spread over the plan layers: per-layer keep fraction q ** w_l."""
    return {"even": [1.0] * count, "early": [float(count - i) for i in range(count)],
            "late": [float(i + 1) for i in range(count)]}


def _last_logits(model, batch):
    out = model(**batch) if isinstance(batch, Mapping) else model(batch)
    return out.logits[:, -1] if hasattr(out, "logits") else out


def calibrate_atp(model, data, reducer: ATP, target_flops: float = 0.5, loss: str = "kl_to_full",
                  forward=None, progress: bool = True) -> ATP:
    """Fit ``reducer``'s thresholds (its layers and strides stay) to a FLOPs budget on unlabeled ``data``.

    ``data``: batches of model inputs (dicts of keyword arguments); ``forward(model, batch) ->
    logits`` (default: the logits of the last position, the next-token distribution after the prompt).
    ``target_flops``: the language model's prefill FLOPs, pruned / unpruned (the vision encoder and
    projector do not change). Procedure (derivative-free; only the thresholds change):

    1. For each spread of the pruning over the layers (even, early, late: per-layer keep fraction
       q ** w_l), q is set by bisection so that the analytic prefill FLOPs ratio, from the data's
       token counts, meets ``target_flops``.
    2. Layer by layer, theta_l is the pooled quantile of the importance that keeps that fraction of
       the visual tokens entering layer l (stride tokens counted as kept), with the earlier
       thresholds in place.
    3. The spread with the least ``loss``, KL(full || pruned) of the next-token distribution
       averaged over the data, wins; it is applied to ``model`` (with the model's other-stage
       reducers) and returned.

    The data are streamed: every step is a pass over ``data`` (so it must be re-iterable, e.g. a
    ``DataLoader``), and only the pooled importance scores are kept between passes.
    """
    import tokred
    from tokred.api import adapter_of

    if not isinstance(reducer, ATP):
        raise ValueError(f"calibrate_atp fits tokred.ATP, got {reducer!r}")
    if isinstance(target_flops, bool) or not isinstance(target_flops, (int, float)) or not 0 < target_flops <= 1:
        raise ValueError(f"target_flops must be in (0, 1] (the pruned / unpruned LLM prefill FLOPs), got {target_flops!r}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; ATP calibrates with {LOSSES} (no labels: KL to the unpruned "
                         "model's next-token distribution)")
    forward = forward if forward is not None else _last_logits
    if iter(data) is data:
        raise ValueError("calibrate_atp passes over the data several times and holds none of it: give a re-iterable "
                         "(a DataLoader or a list of batches), not a one-shot iterator or generator")
    batches = data
    if next(iter(batches), None) is None:
        raise ValueError("calibrate_atp got no data; it needs batches of model inputs")
    others = tuple(r for r in tokred.reducers_of(model) if r.stage != "llm")
    previous = tokred.reducers_of(model) if adapter_of(model) is not None else None
    with tokred.applied(model, *others, replace(reducer, thresholds=-math.inf)):  # validates, changes nothing
        adapter = adapter_of(model)
        costs = [adapter.llm_costs(i) for i in range(len(adapter.layers))]
        overhead = {k: _attention_rows_flops(adapter, k - 1) for k in reducer.layers}
    def kl_to_full(candidate: ATP) -> float:
        """KL(unpruned || pruned) of the next-token distribution, averaged over the data's rows."""
        total, rows = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                with tokred.applied(model, *others):
                    full = forward(model, batch).double().log_softmax(dim=-1)
                with tokred.applied(model, *others, candidate):
                    pruned = forward(model, batch).double().log_softmax(dim=-1)
                total += float((full.exp() * (full - pruned)).sum())
                rows += full.shape[0]
        return total / rows

    try:
        records = _record(model, batches, forward, others, reducer, 1, ())
        counts = ([v for r in records for v in r[3]], [t for r in records for t in r[4]])  # visual, total per sample
        lowest = _llm_ratio(costs, overhead, reducer, [0.0] * len(reducer.layers), counts)
        if lowest > target_flops:
            raise ValueError(f"target_flops={target_flops} is below what this ATP can reach on the data (about "
                             f"{lowest:.3f}: its strides {reducer.strides_list} always keep tokens, and its attention "
                             "rows cost FLOPs); raise the target, use larger strides, or fewer plan layers")
        best = None
        for name, weights in _shapes(len(reducer.layers)).items():
            low, high = 0.0, 1.0
            for _ in range(40):
                q = (low + high) / 2
                if _llm_ratio(costs, overhead, reducer, [q ** w for w in weights], counts) > target_flops:
                    high = q
                else:
                    low = q
            fractions = [low ** w for w in weights]
            thresholds = _fit_thresholds(model, batches, forward, others, reducer, fractions)
            candidate = replace(reducer, thresholds=thresholds)
            kl = kl_to_full(candidate)
            if progress:
                print(f"ATP calibration, {name} spread: keep fractions {[round(f, 3) for f in fractions]}, "
                      f"KL to full {kl:.4g}")
            if best is None or kl < best[0]:
                best = (kl, candidate)
    except BaseException:
        if previous is None:
            tokred.remove(model)
        else:
            tokred.apply(model, *previous)
        raise
    tokred.apply(model, *others, best[1])
    return best[1]
