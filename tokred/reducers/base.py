"""The reducer interface: a small config object plus a pure algorithm on tensors."""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from tokred.plan import Plan

if TYPE_CHECKING:
    from torch import Tensor

    from tokred.signals import Signal
    from tokred.signals import Layout, SequenceSignal

STAGES = ("vision", "projector", "llm")
#: position ids after tokens are removed before the language model or inside it
POSITIONS = ("keep", "renumber")


def check_flag(name: str, value) -> None:
    """A ``TypeError`` unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_fraction(name: str, value) -> None:
    """A ``ValueError`` unless ``value`` is a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


def check_keep(value) -> None:
    """A ``ValueError`` unless ``value`` is a fraction in (0, 1], a token count >= 1 or a :class:`~tokred.Budget`."""
    from tokred.reducers.budget import Budget

    if isinstance(value, bool) or not (isinstance(value, int) and value >= 1
                                       or isinstance(value, float) and 0 < value <= 1 or isinstance(value, Budget)):
        raise ValueError(f"keep must be a fraction in (0, 1] (a float) or a number of tokens >= 1 (an int), "
                         f"got {value!r}; or a tokred.Budget (a per-image fraction)")


def kept_count(keep: int | float, available: int) -> int:
    """Tokens kept out of ``available``: ``keep`` itself if it is a count, else round(keep * available), at least 1."""
    if not isinstance(keep, (int, float)):
        raise ValueError(f"keep={keep!r}: this reducer takes a count or a fraction here, not a per-image Budget "
                         "(DivPrune, Random, FastV, DART, AdjacentMerge and HoliTomInner take one)")
    if isinstance(keep, int):
        if keep > available:
            raise ValueError(f"keep={keep} tokens, but there are only {available}; use a smaller count "
                             "or a fraction")
        return keep
    return max(1, round(keep * available))


def check_finite(reducer: str, what: str, values: Tensor) -> None:
    """A ``ValueError`` if ``values`` holds NaN or infinity: a reducer that ranks or selects on such a
    signal would silently pick the wrong tokens (NaN sorts after every number)."""
    import torch

    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(f"{reducer}: {bad} non-finite value(s) (NaN or inf) in {what}; the model produced them "
                         "before the reducer ran (check the inputs and the dtype: float16 can overflow)")


def per_block(value, num_layers: int, name: str) -> list[float]:
    """One float per block from a float or a sequence of them; a ``ValueError`` when a sequence's
    length is not the number of blocks (``name`` says whose values they are)."""
    from collections.abc import Sequence

    values = list(value) if isinstance(value, Sequence) else [value] * num_layers
    if len(values) != num_layers:
        raise ValueError(f"{len(values)} {name} thresholds given for a model with {num_layers} blocks")
    return [float(v) for v in values]


def keeps_everything(keep) -> bool:
    """``keep`` is the fraction 1.0 (every token) or a budget whose mean keep is 1.0; the int 1 is a
    count of one token."""
    from tokred.reducers.budget import Budget

    return isinstance(keep, float) and keep == 1.0 or isinstance(keep, Budget) and keep.mean_keep == 1.0


def check_positions(value) -> None:
    """``keep``, ``renumber``, or None (the model family's default: ``renumber`` for 1-D positions,
    ``keep`` for Qwen2-VL's 3-D M-RoPE)."""
    if value is not None and value not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS} (keep the original position ids with gaps, or "
                         f"renumber the remaining tokens contiguously) or None (the model's default), got {value!r}")


def check_decoder_layer(layer) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
        raise ValueError(f"layer must be an int >= 1 (the decoder layer K before which tokens are pruned; the "
                         f"signal comes from layer K - 1), got {layer!r}")


def check_decoder_layer_fits(name: str, layer: int, num_layers: int) -> None:
    """A ``ValueError`` unless ``layer`` is a decoder layer 1..num_layers - 1 (an ``llm``-stage
    reducer acts before layer K on a signal from layer K - 1)."""
    if layer >= num_layers:
        allowed = f"1..{num_layers - 1}" if num_layers > 1 else "none: it needs at least 2"
        raise ValueError(f"{name} layer={layer}, but the language model has {num_layers} decoder layers; layer K "
                         f"must be a decoder layer after the first (allowed: {allowed})")


class Reducer:
    """Base class of every reducer.

    A reducer never touches an ``nn.Module``: an adapter hands it the signal it needs and
    applies the :class:`~tokred.plan.Plan` it returns.
    """

    stage: ClassVar[str]
    #: where in a block the reducer acts: "after_attention" (merging, on the block's keys) or
    #: "before_block" (on the tokens entering the block)
    where: ClassVar[str] = "after_attention"
    #: needs per-head queries and keys (``Signal.heads``), not only the keys averaged over heads
    needs_heads: ClassVar[bool] = False
    #: decides token by token, so ``removes`` is only an upper bound, not a request to report on
    decides_per_token: ClassVar[bool] = False
    #: ``llm`` stage: needs the keys of decoder layer K - 1 (``SequenceSignal.keys``)
    needs_keys: ClassVar[bool] = False
    #: ``llm`` stage: needs the last prompt token's attention row at layer K - 1
    needs_last_attention: ClassVar[bool] = False
    #: ``llm`` stage: needs every token's attention row at layer K - 1 (``SequenceSignal.attention``)
    needs_attention: ClassVar[bool] = False
    #: ``llm`` stage: counts the visual items' protected tokens (the ``image_newline`` after a
    #: LLaVA-OneVision video) as visual tokens, which it may drop or merge (``SequenceSignal.visual``)
    counts_protected: ClassVar[bool] = False
    #: ``projector`` stage: needs the attention each visual token received in the vision tower
    #: (``plan_images(..., received=...)``); adapters that cannot provide it refuse the reducer
    needs_tower_attention: ClassVar[bool] = False
    #: ``vision`` stage: the reference runs the model's own head on the merged tokens, so average
    #: pooling is the plain mean of the tokens left, not weighted by their sizes (ToMe, PiToMe on timm)
    pools_plain_mean: ClassVar[bool] = False

    def __str__(self) -> str:
        """The reducer's text spec (``dart:keep=0.25``, :func:`tokred.registry.to_spec`), so
        ``tokred.parse_spec(str(r)) == (r,)``; its ``repr`` when it has no spec (a class that is not
        registered, a :class:`~tokred.Budget` keep): ``to_spec`` says why."""
        from tokred import registry

        try:
            return registry.to_spec(self)
        except ValueError:
            return repr(self)

    @property
    def proportional_attention(self) -> bool:
        """Add log(token size) to the attention logits of later layers (ToMe's proportional
        attention): the reducer's ``prop_attn`` option, off for reducers without one."""
        return getattr(self, "prop_attn", False)

    def check(self, num_layers: int) -> None:
        """Raise ``ValueError`` if this reducer cannot act on a stage with ``num_layers`` layers."""

    def removes(self, layer: int, num_layers: int, signal: Signal) -> int:
        """How many tokens the reducer is asked to remove at ``layer`` (0: it does not act).

        ``signal`` holds the tokens entering the block (its ``keys`` are not computed yet)."""
        raise NotImplementedError

    def overhead_flops(self, signal: Signal | Tensor | SequenceSignal, layout: Layout | None = None) -> int:
        """FLOPs of the reducer's own matmuls when it plans on ``signal``: the vision ``Signal``,
        the projector's features (G, N, C) with their ``layout`` (as ``plan_images`` gets them) or
        the llm ``SequenceSignal``."""
        return 0

    def plan(self, layer: int, num_layers: int, signal: Signal) -> Plan:
        """``vision`` stage: plan for ``layer`` from the tokens, keys, protected count and grid in ``signal``."""
        raise NotImplementedError

    def plan_images(self, features: Tensor, layout: Layout | None) -> Plan:
        """``projector`` stage: plan for the visual tokens ``features`` (G, N, C) of G visual items
        (images or videos) with N tokens each, all with ``layout`` (frames, height, width), or None if
        they form no grid. An item's protected tokens (e.g. the newline after a LLaVA-OneVision
        video) are not among ``features``: the adapter keeps them. A reducer that
        ``needs_tower_attention`` is called with ``received`` (G, N) too: the mean attention each
        token received in the vision tower, laid out like ``features``."""
        raise NotImplementedError

    def decoder_layers(self) -> tuple[int, ...]:
        """``llm`` stage: the decoder layers K before which :meth:`plan_sequence` acts (its ``layer``)."""
        return (self.layer,)

    def plan_sequence(self, signal: SequenceSignal) -> Plan:
        """``llm`` stage: a left-padded plan over the sequences (:func:`tokred.plan.sequence_plan`);
        it may keep and merge visual tokens, never text. By default the tokens of :meth:`keep_mask`."""
        from tokred.plan import sequence_plan

        return sequence_plan(self.keep_mask(signal) & signal.valid)

    def keep_mask(self, signal: SequenceSignal) -> Tensor:
        """``llm`` stage, keep-only reducers: (B, L) True for the tokens that stay (every non-visual token stays)."""
        raise NotImplementedError


class DecoderReducer(Reducer):
    """Base of the ``llm``-stage reducers: they act before decoder layer ``layer`` (K >= 1; their
    signal comes from layer K - 1), keep ``keep`` visual tokens (a count or a fraction) and number the
    remaining tokens by ``positions``. Subclasses are dataclasses with those three fields; they are
    checked here, once."""

    stage: ClassVar[str] = "llm"

    def __post_init__(self):
        check_keep(self.keep)
        check_decoder_layer(self.layer)
        check_positions(self.positions)

    def check(self, num_layers: int) -> None:
        check_decoder_layer_fits(type(self).__name__, self.layer, num_layers)
