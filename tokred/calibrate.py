"""Calibrating learned thresholds to a FLOPs budget (``tokred.calibrate``).

While calibrating, no token is removed: every block computes the same scores as the hard rule
(:func:`tokred.reducers.thresholds.token_scores`), turns the threshold decisions into masks —
the hard 0/1 decision in the forward, the gradient of sigmoid((score - threshold) / temperature)
in the backward (straight-through) — and applies them to token sizes: a pruned token's size
goes to 0, a merged token's size and features move into its match. Attention is weighted by
size, so a size-0 token is invisible, and the forward equals the hard forward, image by image.

The budget is the **FLOPs ratio per image**: the FLOPs of each image run alone with the hard rule
(what ``tokred.flops(model, image)`` reports: patch embedding, blocks, the reducer's own matmuls,
head), summed over the images, over the same sum for the unreduced model. It does not depend on
the batch size (a padded batch runs more: its widest image sets the width). The calibration
forward gives it exactly, from each image's token counts and the adapter's own FLOPs count.

Two steps: only the thresholds train, with cross-entropy plus ``penalty * (FLOPs ratio -
target)^2`` (the ratio's gradient is that of the blocks' costs at the expected token counts); then
one scale moves every threshold towards "remove nothing" or "remove more" (:func:`scaled_thresholds`),
set by bisection on passes over the data until the ratio is within ``tolerance`` of the target.
The data are streamed: each epoch and each pass iterates ``data`` again, one batch at a time.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from tokred.api import adapter_of
from tokred.engine import VisionStage, weight_bias
from tokred.signals import Heads, Signal
from tokred.reducers.thresholds import Thresholds, last_token_guard, token_scores
from tokred.trace import LayerRecord, Trace


def straight_through(score: Tensor, threshold: Tensor, temperature: float) -> Tensor:
    """1 where score > threshold (forward), with the gradient of sigmoid((score - threshold) / T)."""
    soft = torch.sigmoid((score - threshold) / temperature)
    return (score > threshold).to(soft.dtype) + (soft - soft.detach())  # exactly 0 or 1 forward


def scaled_thresholds(merge: Tensor, prune: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Every threshold moved by one ``scale`` in [-1, 1] (0: unchanged).

    Towards removing nothing for ``scale`` > 0: merge -> merge + scale * (1 - merge) (1 is the
    largest cosine similarity), prune -> prune * (1 - scale) (importance is >= 0). Towards removing
    more for ``scale`` < 0: merge -> merge + scale * (merge + 1) (-1 merges every A token), prune ->
    prune * (1 - scale) (doubled at -1). Merge thresholds are first clipped to [-1, 1] and prune
    thresholds to >= 0, where they mean the same. Each threshold moves monotonically with ``scale``.
    """
    merge, prune = merge.clamp(-1.0, 1.0), prune.clamp_min(0.0)
    towards = 1 - merge if scale >= 0 else merge + 1
    return merge + scale * towards, prune * (1 - scale)


def _alone(signal: Signal, image: int, width: int) -> Signal:
    """A signal shaped like ``image``'s with only its ``width`` live tokens (for shape-based FLOPs counts)."""
    heads = signal.heads
    if heads is not None:
        heads = Heads(heads.q[image:image + 1, :, :width], heads.k[image:image + 1, :, :width], heads.scale, None)
    keys = signal.keys[image:image + 1, :width] if signal.keys is not None else None
    return Signal(signal.tokens[image:image + 1, :width], keys, signal.num_protected, None, heads, None)


class Calibration(nn.Module):
    """Trainable per-block thresholds, the soft block that uses them, and the FLOPs of each image."""

    def __init__(self, reducer: Thresholds, adapter):
        super().__init__()
        stage: VisionStage = adapter.vision_stage
        depth = stage.depth
        self.adapter, self.stage_name = adapter, stage.stage
        self.costs = [adapter.layer_costs(layer) for layer in range(depth)]
        merge, prune = zip(*(reducer.thresholds_at(layer, depth) for layer in range(depth)))
        # infinite thresholds (nothing merges or prunes) start at the edge of the scores' range
        self.merge = nn.Parameter(torch.tensor(merge).clamp(-1.0, 1.0))
        self.prune = nn.Parameter(torch.tensor(prune).clamp(0.0, 10.0))
        self.temperature, self.prop_attn = reducer.temperature, reducer.prop_attn
        self.overhead_flops = reducer.overhead_flops  # the hard rule's own count (it depends on shapes only)
        self.presence: Tensor | None = None  # (B, N) 1 for tokens still present (straight-through)
        #: per block of the last forward: tokens entering attention and leaving the block, (B,) each
        #: (expected counts with gradients, exact in value), and each image's reducer FLOPs if it ran alone
        self.counts: list[tuple[Tensor, Tensor, list[int]]] = []
        self.grid: tuple[int, int] | None = None
        self.num_prefix = 0

    def reducer(self) -> Thresholds:
        return Thresholds(merge=self.merge.tolist(), prune=self.prune.tolist(), temperature=self.temperature,
                          prop_attn=self.prop_attn)

    def block(self, stage: VisionStage, layer: int, x: Tensor, attend, feed_forward) -> Tensor:
        """One block with soft decisions: sizes and presence change, the token count does not."""
        run, protected = stage.run, stage.num_prefix
        batch, num_tokens = x.shape[:2]
        if layer == 0:
            run.size = x.new_ones(batch, num_tokens, 1)
            self.presence = x.new_ones(batch, num_tokens)
            self.counts, self.grid, self.num_prefix = [], run.trace.grid, run.trace.num_prefix
        size, presence = run.size[..., 0], self.presence
        weights = size if self.prop_attn else presence
        update, heads = attend(x, weight_bias(weights), True)
        x = x + update
        attention_tokens = presence.sum(dim=1)

        signal = Signal(x, heads.mean_keys(), protected, None, heads, run.size)
        alive, importance, is_a, best, target = token_scores(signal)
        kept = straight_through(importance, self.prune[layer], self.temperature) * alive
        kept = torch.cat([torch.ones_like(kept[:, :protected]), kept[:, protected:]], dim=1)
        merging = straight_through(best.clamp(min=-2.0), self.merge[layer], self.temperature)
        merging = merging * is_a * kept * kept.gather(1, target)
        spared = last_token_guard(alive, importance, (kept * (1 - merging)) == 0, protected)
        kept, merging = torch.where(spared, 1.0, kept), torch.where(spared, 0.0, merging)

        size, presence = size * kept, presence * kept
        moved = merging * size  # mass each merging A token hands to its match
        new_size = (size - moved).scatter_add(1, target, moved)
        index = target[..., None].expand(-1, -1, x.shape[2])
        summed = ((size - moved)[..., None] * x).scatter_add(1, index, moved[..., None] * x)
        x = torch.where(new_size[..., None] > 0, summed / new_size.clamp_min(1e-12)[..., None], x)
        size, presence = new_size, presence * (1 - merging)
        run.size, self.presence = size[..., None], presence
        out_tokens = presence.sum(dim=1)
        # the hard rule counts the reducer's matmuls in a block where the image lost a token
        overhead = [self.overhead_flops(_alone(signal, i, int(before)))
                    if after < before else 0
                    for i, (before, after) in enumerate(zip(attention_tokens.tolist(), out_tokens.tolist()))]
        self.counts.append((attention_tokens, out_tokens, overhead))
        return x + feed_forward(x)

    def _image_flops(self, counts: list[tuple[int, int, int]]) -> int:
        """FLOPs of one image run alone with the hard rule, from its (attention tokens, tokens out,
        reducer FLOPs) per block: the adapter's own count on the trace that run would leave."""
        layers = [LayerRecord(self.stage_name, layer, a, a, o, reducer_flops=f)
                  for layer, (a, o, f) in enumerate(counts)]
        trace = Trace(batch_size=1, num_prefix=self.num_prefix, grid=self.grid, layers=layers)
        return self.adapter.flops(trace).total

    def flops(self) -> tuple[Tensor, int]:
        """(reduced, full) FLOPs of the images of the last forward, each run alone, summed over them.

        ``reduced`` is exact in value (the hard rule's count) and carries the gradient of the
        blocks' costs at the expected token counts (straight-through, like the masks)."""
        attention = torch.stack([a for a, _, _ in self.counts], dim=1)  # (B, layers)
        out = torch.stack([o for _, o, _ in self.counts], dim=1)
        overhead = list(zip(*(f for _, _, f in self.counts)))
        surrogate = sum(cost.flops(attention[:, layer], out[:, layer]) for layer, cost in enumerate(self.costs))
        exact = [self._image_flops(list(zip(a, o, f)))
                 for a, o, f in zip(attention.round().long().tolist(), out.round().long().tolist(), overhead)]
        width = int(attention[0, 0].round())
        full = self._image_flops([(width, width, 0)] * len(self.costs)) * len(exact)
        surrogate = surrogate.sum().double()
        reduced = surrogate - surrogate.detach() + sum(exact)  # float64: exact integers up to 2^53
        return reduced, full


def calibrate(model: nn.Module, data, target_flops: float = 0.5, epochs: int = 1, lr: float = 0.05,
              penalty: float = 20.0, progress: bool = True, forward=None, reducer=None, loss: str = "kl_to_full",
              tolerance: float = 0.01):
    """Train the thresholds of ``model`` (patched with :class:`~tokred.Thresholds`, or unpatched)
    towards ``target_flops`` on ``data``, then scale them until the FLOPs ratio is within
    ``tolerance`` of it; the learned ones are applied to the model, nothing else changes.

    ``target_flops``: the FLOPs ratio per image (reduced / full, each image run alone; see the
    module docstring). ``data``: (images, labels) batches, iterated once per epoch and once per
    pass of the budget search (a ``DataLoader`` or a list, not a one-shot iterator); never held in
    memory. Returns the FLOPs ratio per image the learned thresholds run on ``data`` — the figure
    the progress bar shows last. If no scale reaches the target within ``tolerance`` (a budget
    below what merging every A token in every block gives, say), it warns and keeps the closest.

    ``forward(model, images) -> logits`` turns a model whose call does not return class logits
    into one (e.g. zero-shot logits for a CLIP); default ``model(images)``.

    With ``reducer=tokred.ATP(...)`` it fits that reducer's thresholds in the language model of a
    vision-language model instead, without labels (``data``: batches of model inputs; ``loss``:
    ``"kl_to_full"``), and returns the fitted ATP, applied: :func:`tokred.reducers.atp.calibrate_atp`.
    """
    if reducer is not None:
        from tokred.reducers.atp import ATP, calibrate_atp

        if not isinstance(reducer, ATP):
            raise ValueError(f"calibrate(reducer=...) fits tokred.ATP; got {reducer!r} (for Thresholds, apply them "
                             "and call calibrate without a reducer)")
        return calibrate_atp(model, data, reducer, target_flops, loss, forward, progress)
    forward = forward if forward is not None else (lambda model, images: model(images))
    import tokred

    if isinstance(target_flops, bool) or not isinstance(target_flops, (int, float)) or not 0 < target_flops <= 1:
        raise ValueError(f"target_flops must be in (0, 1], got {target_flops!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1) (absolute, in FLOPs ratio), got {tolerance!r}")
    if iter(data) is data:
        raise ValueError("calibrate iterates data once per epoch and once per pass of its budget search: pass a "
                         "DataLoader or a list of (images, labels) batches, not a one-shot iterator or generator")
    reducers = tokred.reducers_of(model)
    applied_here = not reducers
    if applied_here:
        tokred.apply(model, Thresholds())
        reducers = tokred.reducers_of(model)
    if len(reducers) != 1 or not isinstance(reducers[0], Thresholds):
        raise ValueError(f"calibrate trains tokred.Thresholds; this model has {reducers}")
    adapter = adapter_of(model)
    try:
        calibration = Calibration(reducers[0], adapter)
    except NotImplementedError:
        if applied_here:
            tokred.remove(model)
        raise
    trainable = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    for p in trainable:
        p.requires_grad_(False)
    model.eval()
    adapter.vision_stage.calibration = calibration
    try:
        _train(model, data, calibration, forward, target_flops, epochs, lr, penalty, progress)
        ratio = _fit_budget(model, data, calibration, forward, target_flops, tolerance, progress)
    except BaseException:
        if applied_here:
            tokred.remove(model)
        raise
    finally:
        adapter.vision_stage.calibration = None
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)
    tokred.apply(model, calibration.reducer())
    return ratio


def _bar(total: int | None, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not progress)


def _train(model: nn.Module, data, calibration: Calibration, forward: Callable, target: float, epochs: int,
           lr: float, penalty: float, progress: bool) -> None:
    """Only the thresholds train: cross-entropy + penalty * (the batch's FLOPs ratio per image - target)^2."""
    optimizer = torch.optim.Adam(calibration.parameters(), lr=lr)
    total = epochs * len(data) if hasattr(data, "__len__") else None
    with _bar(total, "calibrating thresholds", progress) as bar:
        for _ in range(epochs):
            seen = 0
            for images, labels in data:
                logits = forward(model, images)
                reduced, full = calibration.flops()
                ratio = reduced / full
                loss = nn.functional.cross_entropy(logits, labels) + penalty * (ratio - target) ** 2
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                seen += 1
                bar.update()
                bar.set_postfix(flops_ratio=f"{ratio.item():.3f}", loss=f"{loss.item():.3f}")
            if not seen:
                raise ValueError("calibrate got an empty data loader; it needs (images, labels) batches")


def _fit_budget(model: nn.Module, data, calibration: Calibration, forward: Callable, target: float,
                tolerance: float, progress: bool, steps: int = 12) -> float:
    """Set one :func:`scaled_thresholds` scale by bisection (the ratio grows with the scale) until the
    FLOPs ratio per image on ``data`` is within ``tolerance`` of ``target``; returns that ratio."""
    learned = calibration.merge.detach().clone(), calibration.prune.detach().clone()

    def measure(scale: float) -> float:
        merge, prune = scaled_thresholds(*learned, scale)
        with torch.no_grad():
            calibration.merge.copy_(merge)
            calibration.prune.copy_(prune)
            reduced = full = 0
            for images, _ in data:
                forward(model, images)
                batch_reduced, batch_full = calibration.flops()
                reduced, full = reduced + batch_reduced.item(), full + batch_full
        return reduced / full

    with _bar(None, "fitting the FLOPs budget", progress) as bar:
        scale, ratio = 0.0, measure(0.0)
        tried = [(abs(ratio - target), scale, ratio)]
        bar.update()
        bar.set_postfix(scale=f"{scale:+.4f}", flops_ratio=f"{ratio:.3f}")
        low, high = (-1.0, 0.0) if ratio > target else (0.0, 1.0)
        for _ in range(steps):
            if abs(ratio - target) <= tolerance:
                break
            scale = (low + high) / 2
            ratio = measure(scale)
            tried.append((abs(ratio - target), scale, ratio))
            low, high = (low, scale) if ratio > target else (scale, high)
            bar.update()
            bar.set_postfix(scale=f"{scale:+.4f}", flops_ratio=f"{ratio:.3f}")
        error, best_scale, best_ratio = min(tried)
        if best_scale != scale:
            ratio = measure(best_scale)
            bar.update()
            bar.set_postfix(scale=f"{best_scale:+.4f}", flops_ratio=f"{ratio:.3f}")
    if error > tolerance:
        warnings.warn(f"calibrate: the closest FLOPs ratio per image reached is {ratio:.4f}, for a target of "
                      f"{target} (tolerance {tolerance}); kept those thresholds", stacklevel=3)
    return ratio
