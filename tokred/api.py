"""The public API: apply, remove, applied, last_trace, flops; and the adapter registry behind them.

Adapters live in the ``tokred.adapters`` package, which the core never imports by name in an
import statement: every adapter class registers itself here (:func:`register_adapter`, called by
``tokred.adapters.base.Adapter`` for each subclass with a ``family``), and :func:`load_adapters` is
the one place the core triggers that package's import, on the first :func:`apply`. A patched model
holds its adapter as ``model._tokred_adapter``; :func:`adapter_of` is the way to read it.
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager

import torch
from torch import nn

from tokred.flops import FlopsReport
from tokred.reducers.base import Reducer
from tokred.trace import Trace

#: the package whose modules define (and so register) the adapters
ADAPTERS_PACKAGE = "tokred.adapters"
_adapters: list[type] = []


def register_adapter(adapter_class: type) -> type:
    """Add an adapter class to those :func:`apply` chooses from (tried in registration order by
    their ``matches(model)``); returns it. ``tokred.adapters.base.Adapter`` calls this for every
    subclass that sets ``family``, so an adapter module registers its classes by being imported."""
    if adapter_class not in _adapters:
        _adapters.append(adapter_class)
    return adapter_class


def load_adapters() -> None:
    """Import :data:`ADAPTERS_PACKAGE` (it imports each of its modules, which register their adapter
    classes). The core's only way to the adapters: by name, when the first model is patched, so that
    ``import tokred`` imports no adapter and no model framework."""
    importlib.import_module(ADAPTERS_PACKAGE)


def registered_adapters() -> tuple[type, ...]:
    """Every registered adapter class, loading the adapters package first."""
    load_adapters()
    return tuple(_adapters)


def find_adapter(model: nn.Module) -> type:
    """The adapter class for ``model``; a ``TypeError`` naming the supported families otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"tokred patches torch.nn.Module models, got {type(model).__name__}")
    wrapped = model._modules.get("_orig_mod")
    if type(model).__name__ == "OptimizedModule" and wrapped is not None:
        raise TypeError(f"tokred cannot patch a torch.compile wrapper (OptimizedModule of {type(wrapped).__name__}): "
                        "apply tokred to the model it wraps, tokred.apply(compiled._orig_mod, ...), or apply it "
                        "before torch.compile")
    adapters = registered_adapters()
    for adapter in adapters:
        if adapter.matches(model):
            return adapter
    families = "; ".join(adapter.family for adapter in adapters)
    raise TypeError(f"tokred has no adapter for {type(model).__module__}.{type(model).__name__}. "
                    f"Supported model families: {families}")


def adapter_of(model: nn.Module):
    """The adapter patched into ``model`` by :func:`apply` (``tokred.adapters.base.Adapter``: its
    ``reducers``, ``trace``, ``vision_stage``, ``layer_costs``), or None when it is not patched."""
    return model.__dict__.get("_tokred_adapter")


def apply(model: nn.Module, *reducers: Reducer) -> nn.Module:
    """Patch ``model`` in place so that ``reducers`` act in its forward; returns the model.

    Applying again replaces the previous reducers. With no reducer the model runs unchanged but
    records a trace, so :func:`flops` works. On any error the model is left as it was.
    """
    adapter_class = find_adapter(model)
    by_stage: dict[str, Reducer] = {}
    for reducer in reducers:
        if not isinstance(reducer, Reducer):
            raise TypeError(f"expected tokred reducers such as tokred.ToMe(r=8), got {reducer!r}")
        if reducer.stage not in adapter_class.stages:
            hint = ("; the projector and the language model are a vision-language model's: apply the reducer to "
                    "the whole model (e.g. tokred.apply(llava, ...)), not to its vision tower"
                    if reducer.stage in ("projector", "llm") else "")
            raise ValueError(f"{type(reducer).__name__} acts at the '{reducer.stage}' stage, which "
                             f"{type(model).__name__} does not have; its stages are {list(adapter_class.stages)}{hint}")
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
    adapter = adapter_of(model)
    if adapter is not None:
        adapter.unpatch()
    return model


def reducers_of(model: nn.Module) -> tuple[Reducer, ...]:
    """The reducers currently applied to ``model`` (empty if it is not patched)."""
    adapter = adapter_of(model)
    return tuple(adapter.reducers.values()) if adapter is not None else ()


@contextmanager
def applied(model: nn.Module, *reducers: Reducer):
    """Apply ``reducers`` for the duration of a ``with`` block, then restore the previous state."""
    previous = reducers_of(model) if adapter_of(model) is not None else None
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
    adapter = adapter_of(model)
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
            if adapter_of(model) is None:
                with applied(model):
                    model(*inputs, **kwargs)
                    return adapter_of(model).flops(last_trace(model))
            model(*inputs, **kwargs)
    trace = last_trace(model)
    return adapter_of(model).flops(trace)
