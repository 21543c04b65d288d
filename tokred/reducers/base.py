"""The reducer interface: a small config object plus a pure algorithm on tensors."""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from tokred.plan import Plan

if TYPE_CHECKING:
    from tokred.engine import Signal

STAGES = ("vision", "projector", "llm")


def check_flag(name: str, value) -> None:
    """A ``TypeError`` unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_fraction(name: str, value) -> None:
    """A ``ValueError`` unless ``value`` is a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


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

    def overhead_flops(self, signal: Signal) -> int:
        """FLOPs of the reducer's own matmuls when it plans on ``signal``."""
        return 0

    def plan(self, layer: int, num_layers: int, signal: Signal) -> Plan:
        """Plan for ``layer`` from the tokens, keys, protected count and grid in ``signal``."""
        raise NotImplementedError
