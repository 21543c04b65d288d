"""Model adapters, one module per model family (installed as ``tokred.adapters``)."""
from __future__ import annotations

from torch import nn

from tokred.adapters.base import Adapter
from tokred.adapters.timm_vit import TimmViTAdapter

ADAPTERS: list[type[Adapter]] = [TimmViTAdapter]


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
