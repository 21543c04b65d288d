"""The trace of the last forward: tokens per layer, final sizes and patch-to-token maps."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class LayerRecord:
    """One layer of one stage in the last forward.

    ``tokens_in`` tokens entered the layer, its attention ran on ``tokens_attention`` (fewer
    when a reducer acts before the block) and ``tokens_out`` left it (its MLP ran on them).
    ``requested`` is what the reducer was asked to remove here; ``reducer_flops`` the FLOPs of
    the reducer's own matmuls.
    """

    stage: str
    layer: int
    tokens_in: int
    tokens_attention: int
    tokens_out: int
    requested: int = 0
    reducer_flops: int = 0
    #: tokens each image really kept, when images keep different numbers (else None: all tokens_out)
    tokens_per_image: list[int] | None = None

    @property
    def removed(self) -> int:
        return self.tokens_in - self.tokens_out


@dataclass
class Trace:
    """What happened to the tokens in the last forward of a patched model.

    Attributes:
        batch_size: images in the batch.
        num_prefix: protected leading tokens (class, distillation, registers).
        grid: (rows, cols) of the patch grid, when the model has one.
        layers: one :class:`LayerRecord` per layer run.
        sizes: (B, M) how many input tokens each final token stands for.
        source_maps: per layer, (B, N0) index of the token that covers each input token after
            that layer (-1 when pruned); input tokens are the prefix tokens then the patches.
        notes: human-readable remarks, e.g. where a requested r was capped.
    """

    batch_size: int
    num_prefix: int
    grid: tuple[int, int] | None
    layers: list[LayerRecord] = field(default_factory=list)
    sizes: Tensor | None = None
    source_maps: list[Tensor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def tokens(self, stage: str | None = None) -> list[int]:
        """Tokens leaving each layer (of ``stage``, if given)."""
        return [rec.tokens_out for rec in self.layers if stage is None or rec.stage == stage]

    @property
    def final_tokens(self) -> int:
        return self.layers[-1].tokens_out if self.layers else 0

    def sources(self, image: int = 0, layer: int = -1) -> list[list[int]]:
        """For each token after ``layer``, the input token indices it covers (ToMe's source trace)."""
        source_map = self.source_maps[layer][image]
        groups: list[list[int]] = [[] for _ in range(int(source_map.max()) + 1)]
        for patch, token in enumerate(source_map.tolist()):
            if token >= 0:
                groups[token].append(patch)
        return groups
