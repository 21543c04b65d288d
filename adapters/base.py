"""What every adapter provides, and the class swap that patches a module reversibly."""
from __future__ import annotations

from typing import ClassVar

from torch import nn

from tokred.flops import FlopsReport, LayerCosts
from tokred.reducers.base import Reducer
from tokred.trace import Trace

_PATCHED_CLASSES: dict[tuple[type, type], type] = {}
#: every adapter class with a ``family``, in definition order
ADAPTERS: list[type[Adapter]] = []


def swap_class(module: nn.Module, mixin: type) -> None:
    """Make ``module`` an instance of ``mixin`` + its own class; undone by :func:`restore_class`."""
    original = type(module)
    patched = _PATCHED_CLASSES.get((original, mixin))
    if patched is None:
        patched = type(f"Tokred{original.__name__}", (mixin, original), {"_tokred_original_class": original})
        _PATCHED_CLASSES[(original, mixin)] = patched
    module.__class__ = patched


def restore_class(module: nn.Module) -> None:
    module.__class__ = module._tokred_original_class


class Adapter:
    """Knows one model family: its hook points, signals, bookkeeping and how to undo itself.

    The constructor only validates (it must leave the model untouched when it raises);
    :meth:`patch` and :meth:`unpatch` change the model.
    """

    family: ClassVar[str]
    stages: ClassVar[tuple[str, ...]]
    #: its attention hands reducers per-head queries and keys (``tokred.engine.Heads``)
    provides_heads: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "family" in cls.__dict__:
            ADAPTERS.append(cls)

    def __init__(self, model: nn.Module, reducers: dict[str, Reducer]):
        self.model = model
        self.reducers = reducers
        self.trace: Trace | None = None

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def patch(self) -> None:
        raise NotImplementedError

    def unpatch(self) -> None:
        raise NotImplementedError

    def flops(self, trace: Trace) -> FlopsReport:
        raise NotImplementedError

    @property
    def vision_stage(self):
        """The :class:`~tokred.engine.VisionStage` running the vision encoder's blocks."""
        return self.stage

    def layer_costs(self, layer: int) -> LayerCosts:
        """FLOPs of vision block ``layer`` as a function of its token counts."""
        raise NotImplementedError(f"{self.family}: no per-block cost model")
