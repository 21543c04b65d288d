"""Analytic FLOPs: 2 x multiply-adds of every matmul run, from the token counts in the trace.

The convention matches ``torch.utils.flop_counter.FlopCounterMode``: linear layers, convolutions,
batched matmuls and scaled-dot-product attention count; normalisation, activations, softmax and
element-wise ops do not.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from tokred.trace import Trace


@dataclass
class FlopsReport:
    """FLOPs of one forward, split by stage (``vision``, ``projector``, ``llm_prefill``, ...).

    ``decode_per_token``: for language models, the FLOPs of generating one more token per sample
    after this forward (with the cache it left); not part of ``total``.
    """

    stages: dict[str, int] = field(default_factory=dict)
    layers: list[tuple[str, str, int]] = field(default_factory=list)
    decode_per_token: int | None = None

    def add(self, stage: str, part: str, flops: int) -> None:
        self.stages[stage] = self.stages.get(stage, 0) + flops
        self.layers.append((stage, part, flops))

    @property
    def total(self) -> int:
        return sum(self.stages.values())

    def __str__(self) -> str:
        rows = [f"{stage:>12}: {value / 1e9:.3f} GFLOPs" for stage, value in self.stages.items()]
        rows.append(f"{'total':>12}: {self.total / 1e9:.3f} GFLOPs")
        if self.decode_per_token is not None:
            rows.append(f"then {self.decode_per_token / 1e9:.3f} GFLOPs per generated token (decode)")
        return "\n".join(rows)


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


@dataclass
class LayerCosts:
    """FLOPs per image of one transformer block as a function of its token counts."""

    per_attention_token: int  # projections, per token entering attention
    per_token_pair: int  # QK^T and AV, per (query, key) pair
    per_mlp_token: int  # MLP, per token leaving the block

    def flops(self, attention_tokens, mlp_tokens, core_tokens=None):
        """Works on ints and on (differentiable) tensors of expected counts alike. ``core_tokens``: the
        tokens the attention core (QK^T, AV) ran on when they are not the projections'
        ``attention_tokens`` (VTU: n rows projected, N virtual tokens attending)."""
        core = attention_tokens if core_tokens is None else core_tokens
        return (self.per_attention_token * attention_tokens + self.per_token_pair * core ** 2
                + self.per_mlp_token * mlp_tokens)


def add_block_flops(report: FlopsReport, trace: Trace, layer_costs: Callable[[int], LayerCosts],
                    stage: str = "vision") -> None:
    """Add ``blockN`` (and ``blockN.reducer``) entries for every ``stage`` layer of ``trace``."""
    for record in trace.layers:
        if record.stage != stage:
            continue
        cost = layer_costs(record.layer).flops(record.tokens_attention, record.tokens_out)
        report.add(stage, f"block{record.layer}", trace.batch_size * cost)
        if record.reducer_flops:
            report.add(stage, f"block{record.layer}.reducer", record.reducer_flops)
