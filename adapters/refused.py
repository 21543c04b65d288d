"""Model families tokred knows and refuses, with the reason, instead of a bare "no adapter".

Not an adapter: the ViT adapters whose frameworks these models come from call :func:`refuse`
first in their ``matches``, so that ``tokred.apply`` raises a ``TypeError`` that says why and
names the supported families, before anything is changed.
"""
from __future__ import annotations

import sys

from torch import nn

#: (module, class name) -> why tokred cannot reduce its tokens
REFUSED = {
    ("timm.models.naflexvit", "NaFlexVit"): (
        "NaFlexViT packs images of different resolutions and aspect ratios into one sequence with "
        "per-image patch masks and position coordinates (variable-resolution packing); tokred's vision "
        "stage assumes one fixed grid of patch tokens per image"),
    ("timm.models.swin_transformer", "SwinTransformer"): (
        "Swin is a hierarchical model: its windowed attention works on fixed windows of the patch grid "
        "and its stages merge 2x2 patches, so tokens cannot be merged or dropped between blocks"),
    ("timm.models.swin_transformer_v2", "SwinTransformerV2"): (
        "Swin V2 is a hierarchical model: its windowed attention works on fixed windows of the patch grid "
        "and its stages merge 2x2 patches, so tokens cannot be merged or dropped between blocks"),
    ("torchvision.models.swin_transformer", "SwinTransformer"): (
        "torchvision's Swin (swin_t, swin_s, swin_b, swin_v2_*) is a hierarchical model: its windowed "
        "attention works on fixed windows of the patch grid and its stages merge 2x2 patches, so tokens "
        "cannot be merged or dropped between blocks"),
}


def refusal(model: nn.Module) -> str | None:
    """Why tokred refuses ``model`` (a known but unsupported family), or None."""
    for (module, name), reason in REFUSED.items():
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(model, cls):
            return reason
    return None


def refuse(model: nn.Module) -> None:
    """Raise a ``TypeError`` with the reason and the supported families if ``model`` is refused."""
    reason = refusal(model)
    if reason is None:
        return
    from tokred.api import registered_adapters

    families = "; ".join(adapter.family for adapter in registered_adapters())
    raise TypeError(f"tokred cannot reduce the tokens of {type(model).__module__}.{type(model).__name__}: {reason}. "
                    f"Supported model families: {families}")
