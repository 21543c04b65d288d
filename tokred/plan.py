"""Plans: how N tokens become M tokens, applied the same way to everything aligned with them.

A :class:`Plan` lists, per image, the input tokens that survive (``keep``, in output order)
and, for merging, the input tokens folded into a survivor (``src``) together with the output
position they fold into (``dst``). A keep-only plan prunes; a plan with ``src``/``dst`` merges.
Every reducer returns a plan and every adapter applies plans through the functions here, so
there is exactly one gather / scatter-merge implementation in tokred.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


def _flat(index: Tensor, num_rows: int) -> Tensor:
    """Row ids into the (B * num_rows) flattened rows for a per-image (B, K) index."""
    offsets = torch.arange(index.shape[0], device=index.device)[:, None] * num_rows
    return (index + offsets).reshape(-1)


def take(x: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` (B, K) of every image of ``x`` (B, N, ...): (B, K, ...).

    Row copies with ``index_select`` on the flattened batch are several times faster on CPU
    than ``gather`` with an index broadcast over the channels.
    """
    batch, num_rows = x.shape[:2]
    rows = x.reshape(batch * num_rows, *x.shape[2:]).index_select(0, _flat(index, num_rows))
    return rows.view(batch, index.shape[1], *x.shape[2:])


def _add_rows(out: Tensor, index: Tensor, values: Tensor) -> Tensor:
    """In place: ``out[b, index[b, k]] += values[b, k]`` for every image b and k."""
    batch, num_rows = out.shape[:2]
    flat_out = out.view(batch * num_rows, *out.shape[2:])
    flat_out.index_add_(0, _flat(index, num_rows), values.reshape(-1, *out.shape[2:]))
    return out


@dataclass
class Plan:
    """How each image's N input tokens become M output tokens.

    Attributes:
        keep: (B, M) input index of every output token, in output order.
        src: (B, R) input indices merged into another token, or None for a pure keep plan.
        dst: (B, R) output position (0 <= dst < M) each ``src`` token merges into.
        num_inputs: N, the number of input tokens.
        padded: images keep different numbers of tokens; ``keep`` and ``src`` entries equal to
            N are padding. Padding outputs are zero with size 0, padding sources add nothing.
        weight: (B, R) the share w_k of each ``src`` token in the token it merges into (0 for
            padding), for merges that are not size-weighted means (HoliTom's beta-weighted clusters
            and repeated halving); None: size-weighted (:meth:`weighted_mean`). Sizes add up either way.
        ordered: ``keep`` is the order the output tokens take in the language model's sequence (when
            positions are renumbered), e.g. HoliTom's [static clusters of a segment, then each frame's
            tokens]; otherwise the projector stage lays the outputs out in the order of their inputs.
    """

    keep: Tensor
    num_inputs: int
    src: Tensor | None = None
    dst: Tensor | None = None
    padded: bool = False
    weight: Tensor | None = None
    ordered: bool = False

    @property
    def num_outputs(self) -> int:
        return self.keep.shape[1]

    @property
    def merges(self) -> bool:
        return self.src is not None and self.src.shape[1] > 0

    def _with_null_row(self, x: Tensor) -> Tensor:
        """``x`` with a zero row appended for padding indices to point at (padded plans only)."""
        return torch.cat([x, x.new_zeros(x.shape[0], 1, *x.shape[2:])], dim=1) if self.padded else x

    def select(self, x: Tensor) -> Tensor:
        """Output tokens' own entries of ``x`` (B, N, ...): positions, masks, ids."""
        return take(self._with_null_row(x), self.keep)

    def sum(self, x: Tensor) -> Tensor:
        """Sum of ``x`` (B, N, ...) over the input tokens each output token stands for."""
        out = self.select(x)
        return _add_rows(out, self.dst, take(self._with_null_row(x), self.src)) if self.merges else out

    def weighted_mean(self, x: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
        """Merged ``x`` (B, N, C) per output token, and the summed sizes (B, M, 1).

        Only the rows that receive merges are touched: a destination d with merged sources k
        becomes x_d + sum_k w_k (x_k - x_d), i.e. (1 - sum_k w_k) x_d + sum_k w_k x_k, with the
        plan's ``weight`` w_k when it has one, else w_k = s_k / (s_d + sum_k s_k): the size-weighted mean.
        """
        out, out_size = self.select(x), self.sum(size)
        if self.merges:
            x = self._with_null_row(x)
            if self.weight is None:
                weight = take(self._with_null_row(size), self.src) / take(out_size, self.dst)
            else:
                weight = self.weight.to(x.dtype).view(*self.weight.shape, *[1] * (x.dim() - 2))
            _add_rows(out, self.dst, weight * (take(x, self.src) - take(out, self.dst)))
        return out, out_size

    def destinations(self) -> Tensor:
        """(B, N) output position each input token ends up in, or -1 if it was dropped."""
        batch = self.keep.shape[0]
        dest = self.keep.new_full((batch, self.num_inputs + 1), -1)  # the last column absorbs padding
        positions = torch.arange(self.num_outputs, device=self.keep.device).expand(batch, -1)
        dest.scatter_(1, self.keep, positions)
        if self.merges:
            dest.scatter_(1, self.src, self.dst)
        return dest[:, :self.num_inputs]


def follow(source_map: Tensor, plan: Plan) -> Tensor:
    """Update a (B, N0) map from original patches to current tokens through ``plan``.

    Entries are current token indices, -1 for patches whose token was pruned.
    """
    dest = plan.destinations()
    covered = source_map >= 0
    moved = dest.gather(1, source_map.clamp(min=0))
    return torch.where(covered, moved, source_map)


def sequence_plan(keep: Tensor, merge_into: Tensor | None = None, weight: Tensor | None = None) -> Plan:
    """A left-padded plan over sequences (B, L): the tokens where ``keep`` is True stay, in order,
    each row left-padded to the longest (padding entries point at L: ``Plan.padded``); a token with
    ``merge_into[b, i] = j >= 0`` (a kept token j) merges into j, with the share ``weight[b, i]``
    (``Plan.weight``) when ``weight`` (B, L) is given, else size-weighted. The one way ``llm``-stage
    reducers build their plans."""
    batch, length = keep.shape
    counts = keep.sum(dim=1)
    width = int(counts.max()) if batch else 0
    # stable sort: kept tokens last, in order; the first width - count entries of a row are padding
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, length - width:]
    slot = torch.arange(width, device=keep.device)
    pad = slot[None, :] < (width - counts)[:, None]
    plan = Plan(keep=torch.where(pad, length, order), num_inputs=length, padded=bool(pad.any()))
    if merge_into is None or not bool((merge_into >= 0).any()):
        return plan
    merged = merge_into >= 0
    if bool((keep & merged).any()) or not bool(keep.gather(1, merge_into.clamp(min=0))[merged].all()):
        raise ValueError("a merged token must be dropped and merge into a kept token")
    output = plan.destinations()  # (B, L) output slot of every kept token
    rows, sources = merged.nonzero(as_tuple=True)
    per_row = torch.bincount(rows, minlength=batch)
    most = int(per_row.max())
    src = torch.full((batch, most), length, dtype=torch.long, device=keep.device)
    dst = torch.full((batch, most), width - 1, dtype=torch.long, device=keep.device)  # padding: a real slot
    column = torch.arange(len(rows), device=keep.device) - (per_row.cumsum(0) - per_row)[rows]
    src[rows, column] = sources
    dst[rows, column] = output[rows, merge_into[rows, sources]]
    shares = None
    if weight is not None:
        shares = weight.new_zeros(batch, most)  # padding sources: no share
        shares[rows, column] = weight[rows, sources]
    return replace(plan, src=src, dst=dst, padded=plan.padded or bool((src == length).any()), weight=shares)
