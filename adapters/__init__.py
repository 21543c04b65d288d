"""Model adapters, one module per model family (installed as ``tokred.adapters``).

Importing this package imports every module in it, and each :class:`Adapter` subclass with a
``family`` registers itself with the core (``tokred.api.register_adapter``), so adding a family is
adding a module. The core imports this package only through ``tokred.api.load_adapters``. Adapter
modules import their framework (timm, open_clip, transformers) lazily, inside ``matches``.
"""
from __future__ import annotations

import importlib
import pkgutil

from tokred.adapters.base import Adapter
from tokred.api import find_adapter

__all__ = ["Adapter", "find_adapter"]

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_module.name}")
