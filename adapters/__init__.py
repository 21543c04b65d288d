"""Model adapters, one module per model family (installed as ``tokred.adapters``).

Every module here is imported on first use and each :class:`Adapter` subclass with a
``family`` registers itself, so adding a family is adding a module. Adapter modules import
their framework (timm, open_clip, transformers) lazily, inside ``matches``.
"""
from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from tokred.adapters.base import ADAPTERS, Adapter

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_module.name}")


def find_adapter(model: nn.Module) -> type[Adapter]:
    """The adapter class for ``model``; a ``TypeError`` naming the supported families otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"tokred patches torch.nn.Module models, got {type(model).__name__}")
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    families = "; ".join(adapter.family for adapter in ADAPTERS)
    raise TypeError(f"tokred has no adapter for {type(model).__module__}.{type(model).__name__}. "
                    f"Supported model families: {families}")
