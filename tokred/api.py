"""The public API: apply, remove, applied, last_trace, flops."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from tokred.flops import FlopsReport
from tokred.reducers.base import Reducer
from tokred.trace import Trace

def _adapter(model: nn.Module):
    """The adapter patched into ``model`` (adapters store themselves as ``_tokred_adapter``)."""
    return model.__dict__.get("_tokred_adapter")


def apply(model: nn.Module, *reducers: Reducer) -> nn.Module:
    """Patch ``model`` in place so that ``reducers`` act in its forward; returns the model.

    Applying again replaces the previous reducers. With no reducer the model runs unchanged but
    records a trace, so :func:`flops` works. On any error the model is left as it was.
    """
    from tokred.adapters import find_adapter

    adapter_class = find_adapter(model)
    by_stage: dict[str, Reducer] = {}
    for reducer in reducers:
        if not isinstance(reducer, Reducer):
            raise TypeError(f"expected tokred reducers such as tokred.ToMe(r=8), got {reducer!r}")
        if reducer.stage not in adapter_class.stages:
            raise ValueError(f"{type(reducer).__name__} acts at the '{reducer.stage}' stage, which "
                             f"{type(model).__name__} does not have; its stages are {list(adapter_class.stages)}")
        if reducer.needs_heads and not adapter_class.provides_heads:
            raise ValueError(f"{type(reducer).__name__} needs the attention's per-head queries and keys, which "
                             f"tokred's adapter for {type(model).__name__} does not provide yet")
        if reducer.stage in by_stage:
            raise ValueError(f"two reducers at the '{reducer.stage}' stage ({by_stage[reducer.stage]!r} and "
                             f"{reducer!r}); give one reducer per stage")
        by_stage[reducer.stage] = reducer
    adapter = adapter_class(model, by_stage)  # validates; raises before anything is changed
    remove(model)
    adapter.patch()
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the model's original classes and forward come back exactly."""
    adapter = _adapter(model)
    if adapter is not None:
        adapter.unpatch()
    return model


def reducers_of(model: nn.Module) -> tuple[Reducer, ...]:
    """The reducers currently applied to ``model`` (empty if it is not patched)."""
    adapter = _adapter(model)
    return tuple(adapter.reducers.values()) if adapter is not None else ()


@contextmanager
def applied(model: nn.Module, *reducers: Reducer):
    """Apply ``reducers`` for the duration of a ``with`` block, then restore the previous state."""
    previous = reducers_of(model) if _adapter(model) is not None else None
    apply(model, *reducers)
    try:
        yield model
    finally:
        if previous is None:
            remove(model)
        else:
            apply(model, *previous)


def last_trace(model: nn.Module) -> Trace:
    """The trace of the last forward of a patched model."""
    adapter = _adapter(model)
    if adapter is None:
        raise ValueError("model is not patched by tokred; call tokred.apply(model, ...) first")
    if adapter.trace is None:
        raise ValueError("the patched model has not run a forward yet, so there is no trace")
    return adapter.trace


def flops(model: nn.Module, *inputs, **kwargs) -> FlopsReport:
    """Analytic FLOPs of the last forward, by stage.

    With ``inputs``, first runs ``model(*inputs, **kwargs)`` without gradients (an unpatched
    model is patched with no reducer for that run), so ``tokred.flops(model, images)`` also
    gives the FLOPs of an unreduced model.
    """
    if inputs or kwargs:
        with torch.no_grad():
            if _adapter(model) is None:
                with applied(model):
                    model(*inputs, **kwargs)
                    return _adapter(model).flops(last_trace(model))
            model(*inputs, **kwargs)
    trace = last_trace(model)
    return _adapter(model).flops(trace)
