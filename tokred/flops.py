"""Analytic FLOPs: 2 x multiply-adds of every matmul run, from the token counts in the trace.

The convention matches ``torch.utils.flop_counter.FlopCounterMode``: linear layers, convolutions,
batched matmuls and scaled-dot-product attention count; normalisation, activations, softmax and
element-wise ops do not.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class FlopsReport:
    """FLOPs of one forward, split by stage (``vision``, ``projector``, ``llm_prefill``, ...)."""

    stages: dict[str, int] = field(default_factory=dict)
    layers: list[tuple[str, str, int]] = field(default_factory=list)

    def add(self, stage: str, part: str, flops: int) -> None:
        self.stages[stage] = self.stages.get(stage, 0) + flops
        self.layers.append((stage, part, flops))

    @property
    def total(self) -> int:
        return sum(self.stages.values())

    def __str__(self) -> str:
        rows = [f"{stage:>12}: {value / 1e9:.3f} GFLOPs" for stage, value in self.stages.items()]
        return "\n".join(rows + [f"{'total':>12}: {self.total / 1e9:.3f} GFLOPs"])


def linear_flops(module: nn.Module, rows: int) -> int:
    """FLOPs of every ``nn.Linear`` inside ``module`` applied to ``rows`` token vectors."""
    return sum(2 * rows * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def conv_flops(conv: nn.Conv2d, batch: int, out_hw: tuple[int, int]) -> int:
    """FLOPs of a 2-D convolution producing ``out_hw`` outputs per channel."""
    per_output = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    return 2 * batch * conv.out_channels * out_hw[0] * out_hw[1] * per_output


def attention_flops(batch: int, heads: int, queries: int, keys: int, head_dim: int, value_dim: int | None = None) -> int:
    """FLOPs of QK^T and AV for ``heads`` heads of ``queries`` x ``keys`` attention."""
    value_dim = head_dim if value_dim is None else value_dim
    return 2 * batch * heads * queries * keys * (head_dim + value_dim)
