"""Calibrating learned thresholds to a FLOPs budget (``tokred.calibrate``).

While calibrating, no token is removed: every block computes the same scores as the hard rule
(:func:`tokred.reducers.thresholds.token_scores`), turns the threshold decisions into masks —
the hard 0/1 decision in the forward, the gradient of sigmoid((score - threshold) / temperature)
in the backward (straight-through) — and applies them to token sizes: a pruned token's size
goes to 0, a merged token's size and features move into its match. Attention is weighted by
size, so a size-0 token is invisible, and the forward equals the hard forward. The expected
FLOPs follow from the masks, and only the thresholds are trained, with cross-entropy plus
``penalty * (FLOPs ratio - target)^2``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tokred.api import adapter_of
from tokred.engine import VisionStage, weight_bias
from tokred.signals import Signal
from tokred.flops import LayerCosts
from tokred.reducers.thresholds import Thresholds, last_token_guard, token_scores


def straight_through(score: Tensor, threshold: Tensor, temperature: float) -> Tensor:
    """1 where score > threshold (forward), with the gradient of sigmoid((score - threshold) / T)."""
    soft = torch.sigmoid((score - threshold) / temperature)
    return (score > threshold).to(soft.dtype) + (soft - soft.detach())  # exactly 0 or 1 forward


class Calibration(nn.Module):
    """Trainable per-block thresholds and the soft block that uses them."""

    def __init__(self, reducer: Thresholds, costs: list[LayerCosts]):
        super().__init__()
        depth = len(costs)
        merge, prune = zip(*(reducer.thresholds_at(layer, depth) for layer in range(depth)))
        # infinite thresholds (nothing merges or prunes) start at the edge of the scores' range
        self.merge = nn.Parameter(torch.tensor(merge).clamp(-1.0, 1.0))
        self.prune = nn.Parameter(torch.tensor(prune).clamp(0.0, 10.0))
        self.temperature, self.prop_attn, self.costs = reducer.temperature, reducer.prop_attn, costs
        self.presence: Tensor | None = None  # (B, N) 1 for tokens still present (straight-through)
        self.expected_flops: Tensor | None = None
        self.full_flops = 0

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
            self.expected_flops = x.new_zeros(())
            self.full_flops = sum(cost.flops(num_tokens, num_tokens) for cost in self.costs)
        size, presence = run.size[..., 0], self.presence
        weights = size if self.prop_attn else presence
        update, heads = attend(x, weight_bias(weights), True)
        x = x + update
        attention_tokens = presence.sum(dim=1)

        alive, importance, is_a, best, target = token_scores(Signal(x, heads.mean_keys(), protected, None, heads,
                                                                    run.size))
        kept = straight_through(importance, self.prune[layer], self.temperature) * alive
        kept = torch.cat([torch.ones_like(kept[:, :protected]), kept[:, protected:]], dim=1)
        merging = straight_through(best.clamp(min=-2.0), self.merge[layer], self.temperature)
        merging = merging * is_a * kept * kept.gather(1, target)
        spared = last_token_guard(alive, importance, (kept * (1 - merging)) == 0)
        kept, merging = torch.where(spared, 1.0, kept), torch.where(spared, 0.0, merging)

        size, presence = size * kept, presence * kept
        moved = merging * size  # mass each merging A token hands to its match
        new_size = (size - moved).scatter_add(1, target, moved)
        index = target[..., None].expand(-1, -1, x.shape[2])
        summed = ((size - moved)[..., None] * x).scatter_add(1, index, moved[..., None] * x)
        x = torch.where(new_size[..., None] > 0, summed / new_size.clamp_min(1e-12)[..., None], x)
        size, presence = new_size, presence * (1 - merging)
        run.size, self.presence = size[..., None], presence
        cost = self.costs[layer].flops(attention_tokens, presence.sum(dim=1))
        self.expected_flops = self.expected_flops + cost.mean()
        return x + feed_forward(x)

    def flops_ratio(self) -> Tensor:
        """Expected FLOPs of the blocks in the last forward, over those of the unreduced blocks."""
        return self.expected_flops / self.full_flops


def calibrate(model: nn.Module, data, target_flops: float = 0.5, epochs: int = 1, lr: float = 0.05,
              penalty: float = 20.0, progress: bool = True, forward=None) -> float:
    """Train the thresholds of ``model`` (patched with :class:`~tokred.Thresholds`, or unpatched)
    towards ``target_flops`` (FLOPs ratio, reduced / full) on ``data``, an iterable of
    (images, labels) batches. Only the thresholds change; the learned ones are applied to the
    model. Returns the FLOPs ratio the hard rule actually runs on ``data``.

    ``forward(model, images) -> logits`` turns a model whose call does not return class logits
    into one (e.g. zero-shot logits for a CLIP); default ``model(images)``.
    """
    forward = forward if forward is not None else (lambda model, images: model(images))
    from tqdm import tqdm

    import tokred

    if not 0 < target_flops <= 1:
        raise ValueError(f"target_flops must be in (0, 1], got {target_flops}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    batches = list(data)
    if not batches:
        raise ValueError("calibrate got an empty data loader; it needs (images, labels) batches")
    reducers = tokred.reducers_of(model)
    applied_here = not reducers
    if applied_here:
        tokred.apply(model, Thresholds())
        reducers = tokred.reducers_of(model)
    if len(reducers) != 1 or not isinstance(reducers[0], Thresholds):
        raise ValueError(f"calibrate trains tokred.Thresholds; this model has {reducers}")
    adapter = adapter_of(model)
    stage: VisionStage = adapter.vision_stage
    try:
        calibration = Calibration(reducers[0], [adapter.layer_costs(layer) for layer in range(stage.depth)])
    except NotImplementedError:
        if applied_here:
            tokred.remove(model)
        raise
    optimizer = torch.optim.Adam(calibration.parameters(), lr=lr)
    trainable = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    for p in trainable:
        p.requires_grad_(False)
    model.eval()
    stage.calibration = calibration
    try:
        bar = tqdm(total=epochs * len(batches), desc="calibrating thresholds", disable=not progress)
        for _ in range(epochs):
            for images, labels in batches:
                logits = forward(model, images)
                ratio = calibration.flops_ratio()
                loss = nn.functional.cross_entropy(logits, labels) + penalty * (ratio - target_flops) ** 2
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                bar.update()
                bar.set_postfix(flops=f"{ratio.item():.3f}", loss=f"{loss.item():.3f}")
        bar.close()
    finally:
        stage.calibration = None
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)
    tokred.apply(model, calibration.reducer())
    reduced = full = 0
    with torch.no_grad():
        for images, _ in batches:
            forward(model, images)
            reduced += tokred.flops(model).total
            with tokred.applied(model):
                forward(model, images)
                full += tokred.flops(model).total
    return reduced / full if full else math.nan
