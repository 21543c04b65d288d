"""VTU: virtual token unmerging inside the language model (DyMU, Wang et al., "DyMU: Dynamic Merging and
Virtual Unmerging for Efficient VLMs", NeurIPS 2025, arXiv 2504.17040).

A vision-stage (or projector-stage) merger hands the language model n rows (text and merged visual
tokens) that stand for the N tokens of the unreduced prompt (text and every patch). VTU runs every
decoder layer as if the N tokens were there, at the cost of n rows wherever the rule allows:

- row-wise parts (norms, the q/k/v/o projections, the MLP) run on the n rows: they commute with
  duplicating rows;
- attention runs on the virtual full-length sequence: q, k and v of the n rows are copied to the N
  virtual tokens by the source map m (virtual token -> row; text maps to itself, a patch to the merged
  token covering it), rotated at the virtual (unmerged) positions, and attend causally over the N
  tokens with the model's own attention (fused SDPA); the N outputs are averaged back onto their row
  (the mean over m(i) = u), then the output projection, residual and MLP run on n rows.

The only approximation: a group keeps one hidden state where the unreduced model's copies would drift
apart (a non-linear MLP of a group's mean is not the mean of its outputs). As in the reference the KV
cache holds the expanded, rotated keys and values (N rows), so decoding attends over N tokens.

:func:`remerge_plan` builds the averaging as a :class:`~tokred.plan.Plan` (the one scatter-merge of
tokred); :class:`VTU` is the reducer a user applies next to the merger; the language-model engine
(:mod:`tokred.decoder`) runs the layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from tokred.plan import Plan
from tokred.reducers.base import Reducer


def remerge_plan(rows: Tensor, num_rows: int) -> Plan:
    """The plan that averages N virtual tokens back onto the n rows they come from.

    Args:
        rows: (B, N) the row (0 <= row < ``num_rows``) each virtual token is a copy of; -1 for
            virtual tokens that stand for nothing (padding, pruned tokens).
        num_rows: n, the rows of the merged sequence.

    Returns a padded plan from N inputs to n outputs: output u keeps the first virtual token of its
    group (m(i) = u) and the group's other tokens merge into it, so
    ``plan.weighted_mean(x, valid sizes)`` is the group mean and ``plan.destinations()`` is ``rows``.
    A row no virtual token maps to (padding) is a padding output (zero, size 0).
    """
    batch, num_virtual = rows.shape
    index = torch.arange(num_virtual, device=rows.device).expand(batch, -1)
    valid = rows >= 0
    target = torch.where(valid, rows, num_rows)  # invalid tokens go to a spare column
    first = torch.full((batch, num_rows + 1), num_virtual, dtype=torch.long, device=rows.device)
    first = first.scatter_reduce(1, target, index, reduce="amin")[:, :num_rows]
    merged = valid & (first.gather(1, rows.clamp(min=0)) != index)
    most = int(merged.sum(dim=1).max()) if batch else 0
    order = torch.sort(merged.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :most]
    taken = merged.gather(1, order)
    src = torch.where(taken, order, num_virtual)
    # padding sources add nothing; they point at an output with a real token (a row that exists), so no 0/0
    has_rows = first < num_virtual
    spare = torch.where(has_rows.any(dim=1), has_rows.long().argmax(dim=1), 0)[:, None]
    dst = torch.where(taken, rows.gather(1, order), spare)
    return Plan(keep=first, num_inputs=num_virtual, src=src, dst=dst, padded=True)


@dataclass(frozen=True)
class VTU(Reducer):
    """DyMU's virtual token unmerging in the language model (see the module docstring).

    It removes no token itself: it undoes, inside attention, the merges of the reducer at the
    ``vision`` or ``projector`` stage it is applied with (``tokred.apply(llava, DToMe(...), VTU())``;
    the LLaVA family and Qwen2-VL), from the source maps that reducer leaves. Virtual tokens keep
    the unreduced prompt's positions, so decoding continues at the unreduced positions; a token
    pruned upstream has no virtual copy. It occupies the ``llm`` stage (no other ``llm`` reducer
    with it) and has no parameters.
    """

    stage: ClassVar[str] = "llm"
    #: the language-model engine runs attention on the virtual full-length sequence
    unmerges: ClassVar[bool] = True
    #: every token stays (an unreduced prompt runs the model's own forward)
    keep: ClassVar[float] = 1.0

    def decoder_layers(self) -> tuple[int, ...]:
        """No plan before any decoder layer."""
        return ()
