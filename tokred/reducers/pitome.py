"""PiToMe: energy-protected token merging (Tran et al., "Accelerating Transformers with
Spectrum-Preserving Token Merging", NeurIPS 2024).

Tokens in large, mutually similar groups (high energy) are merged; isolated, informative
tokens (low energy) are protected.
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
from tokred.reducers.base import Reducer, check_flag, check_fraction

if TYPE_CHECKING:
    from tokred.signals import Signal


def energy_scores(metric: Tensor, margin: float, alpha: float = 1.0) -> tuple[Tensor, Tensor]:
    """PiToMe's energy of every token and the cosine similarities it comes from.

    E_i = mean over j (itself included) of ELU_alpha(cos(m_i, m_j) - margin), for ``metric``
    (B, T, D) of the unprotected tokens. Returns (energy (B, T), similarity (B, T, T)).
    """
    unit = F.normalize(metric, dim=-1)
    similarity = unit @ unit.transpose(-1, -2)
    return F.elu(similarity - margin, alpha=alpha).mean(dim=-1), similarity


def energy_matching(metric: Tensor, r: int, num_protected: int = 0, margin: float = 0.75,
                    alpha: float = 1.0, protect_low_energy: bool = True) -> Plan:
    """PiToMe's merge plan, as a pure function.

    Args:
        metric: (B, N, D) per-token features (keys averaged over heads).
        r: tokens to remove; capped at ``(N - num_protected) // 2``.
        num_protected: leading tokens (class, registers) that never merge and take no part.
        margin, alpha: of the energy score (see :func:`energy_scores`).
        protect_low_energy: True: only the 2r highest-energy tokens are candidates, split
            alternately (in energy order) into A and B, and every A merges into its most
            similar B. False: all tokens, in energy order, are split alternately into A and B,
            and the r A tokens with the best matches merge (bipartite matching on energy-sorted
            tokens). Ties in energy or score go to the lower position.

    Surviving tokens keep their original order.
    """
    batch, num_tokens, _ = metric.shape
    protected = num_protected
    r = max(0, min(r, (num_tokens - protected) // 2))
    if r == 0:
        return Plan(keep=torch.arange(num_tokens, device=metric.device).expand(batch, -1), num_inputs=num_tokens)
    energy, similarity = energy_scores(metric[:, protected:], margin, alpha)
    order = energy.argsort(dim=-1, descending=True, stable=True)
    candidates = order[:, :2 * r] if protect_low_energy else order
    a, b = candidates[:, 0::2], candidates[:, 1::2]
    scores = similarity.gather(1, a[..., None].expand(-1, -1, similarity.shape[2]))
    scores = scores.gather(2, b[:, None, :].expand(-1, a.shape[1], -1))
    best_score, best_b = scores.max(dim=-1)
    if protect_low_energy:
        merged = torch.arange(r, device=metric.device).expand(batch, -1)
    else:
        merged = best_score.argsort(dim=-1, descending=True, stable=True)[:, :r]
    src = protected + a.gather(1, merged)
    target = protected + b.gather(1, best_b.gather(1, merged))
    survives = torch.ones(batch, num_tokens, dtype=torch.bool, device=metric.device)
    survives.scatter_(1, src, False)
    keep = survives.nonzero()[:, 1].view(batch, num_tokens - r)
    output_position = survives.long().cumsum(dim=1) - 1
    return Plan(keep=keep, num_inputs=num_tokens, src=src, dst=output_position.gather(1, target))


def default_margin(layer: int, num_layers: int) -> float:
    """PiToMe's margin schedule m_l = 0.75 - 0.75 * l / L."""
    return 0.75 - 0.75 * layer / num_layers


@dataclass(frozen=True)
class PiToMe(Reducer):
    """PiToMe in the vision encoder.

    Args:
        keep: each block keeps this fraction of its T unprotected tokens (the class and register
            tokens are not counted), removing r = floor(T - T * keep).
        margin: energy margin: None for the paper's schedule 0.75 - 0.75 * l / L, a float for a
            constant margin, or one float per block.
        alpha: ELU alpha of the energy score.
        protect_low_energy: which matching to use: "auto" (the reference's choice: plain
            bipartite matching of energy-sorted tokens in the first ceil(L/2) blocks, the
            protected variant after), True (always protected) or False (always plain).
        prop_attn: proportional attention; off in the reference.
    """

    keep: float = 0.9
    margin: float | Sequence[float] | None = None
    alpha: float = 1.0
    protect_low_energy: bool | str = "auto"
    prop_attn: bool = False

    stage = "vision"
    pools_plain_mean = True

    def __post_init__(self):
        check_fraction("keep", self.keep)
        margins = [] if self.margin is None else (
            list(self.margin) if isinstance(self.margin, Sequence) else [self.margin])
        for value in [*margins, self.alpha]:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"margin and alpha must be finite numbers, got margin={self.margin!r}, "
                                 f"alpha={self.alpha!r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.protect_low_energy not in ("auto", True, False):
            raise ValueError(f"protect_low_energy must be 'auto', True or False, got {self.protect_low_energy!r}")
        check_flag("prop_attn", self.prop_attn)

    def check(self, num_layers: int) -> None:
        if isinstance(self.margin, Sequence) and len(self.margin) != num_layers:
            raise ValueError(f"{len(self.margin)} margins given for a model with {num_layers} blocks")

    def margin_at(self, layer: int, num_layers: int) -> float:
        if self.margin is None:
            return default_margin(layer, num_layers)
        return float(self.margin[layer] if isinstance(self.margin, Sequence) else self.margin)

    def protects_at(self, layer: int, num_layers: int) -> bool:
        if self.protect_low_energy == "auto":
            return layer >= math.ceil(num_layers / 2)
        return self.protect_low_energy

    def removes(self, layer: int, num_layers: int, signal: Signal) -> int:
        num_tokens = signal.tokens.shape[1] - signal.num_protected  # the reference counts no class token
        return math.floor(num_tokens - num_tokens * self.keep)

    def plan(self, layer: int, num_layers: int, signal: Signal) -> Plan:
        keys, num_protected = signal.keys, signal.num_protected
        return energy_matching(keys, self.removes(layer, num_layers, signal), num_protected,
                               margin=self.margin_at(layer, num_layers), alpha=self.alpha,
                               protect_low_energy=self.protects_at(layer, num_layers))

    def overhead_flops(self, signal: Signal) -> int:
        """The energy's similarity matmul; matching reuses its entries."""
        batch, num_tokens, dim = signal.keys.shape
        return 2 * batch * (num_tokens - signal.num_protected) ** 2 * dim
