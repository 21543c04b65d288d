"""What every adapter provides, the class swap that patches a module reversibly, and the pieces
the vision adapters share: a patched module's original methods and the FLOPs of an attention
block or an attention-pooling head.

A module under an accelerate hook (``device_map``, ``accelerate.dispatch_model``) runs an
instance-level ``forward`` that calls the hook and then ``module._old_forward``, the forward the
module had when hooked. tokred goes under the hook: it patches ``_old_forward`` and leaves the
hook and its ``forward`` as they are (:func:`replace_forward`)."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ClassVar

from torch import nn

from tokred.api import register_adapter
from tokred.flops import FlopsReport, LayerCosts, attention_flops, linear_flops
from tokred.reducers.base import Reducer
from tokred.trace import Trace

_PATCHED_CLASSES: dict[tuple[type, type], type] = {}


def patched_class(original: type, mixin: type) -> type:
    """The class ``mixin`` + ``original`` (one per pair), whose instances pickle by that pair."""
    patched = _PATCHED_CLASSES.get((original, mixin))
    if patched is None:
        patched = type(f"Tokred{original.__name__}", (mixin, original),
                       {"_tokred_original_class": original, "_tokred_mixin": mixin, "__reduce_ex__": _reduce_patched})
        _PATCHED_CLASSES[(original, mixin)] = patched
    return patched


def _reduce_patched(module: nn.Module, protocol: int):
    """Pickle a patched module as its original class and mixin (importable classes, unlike the
    patched class built at run time), then its state as usual."""
    _, _, *rest = object.__reduce_ex__(module, protocol)  # (copyreg.__newobj__, (patched class,), state, ...)
    return (_new_patched, (module._tokred_original_class, module._tokred_mixin), *rest)


def _new_patched(original: type, mixin: type) -> nn.Module:
    """An empty instance of :func:`patched_class` (unpickling fills its state)."""
    patched = patched_class(original, mixin)
    return patched.__new__(patched)


def swap_class(module: nn.Module, mixin: type) -> None:
    """Make ``module`` an instance of ``mixin`` + its own class; undone by :func:`restore_class`."""
    patched = patched_class(type(module), mixin)
    module.__class__ = patched
    if is_hooked(module):  # the hook calls the forward it wrapped, the original class's: wrap the patched one
        replace_forward(module, patched.forward.__get__(module))


def restore_class(module: nn.Module) -> None:
    module.__class__ = module._tokred_original_class
    if "_tokred_replaced" in module.__dict__:
        restore_forward(module)


def is_hooked(module: nn.Module) -> bool:
    """``module`` runs under an accelerate hook: an instance ``forward`` calling ``_hf_hook`` around ``_old_forward``."""
    return {"_hf_hook", "_old_forward", "forward"} <= module.__dict__.keys()


def check_forwards(model: nn.Module) -> None:
    """Refuse (before anything is changed) a module of ``model`` whose instance-level ``forward``
    tokred cannot account for: the only one it knows is an accelerate hook's, wrapping the forward
    of the module's own class."""
    for name, module in model.named_modules():
        if "forward" not in module.__dict__ or "_tokred_replaced" in module.__dict__:
            continue  # a plain module, or one tokred patched itself (apply replaces it after remove)
        forward, wrapped = module.__dict__["forward"], module.__dict__.get("_old_forward")
        if not (is_hooked(module) and isinstance(forward, functools.partial) and forward.args[:1] == (module,)
                and getattr(wrapped, "__self__", None) is module
                and getattr(wrapped, "__func__", None) is getattr(type(module).forward, "__func__", type(module).forward)):
            raise ValueError(f"module {name or '<model>'!r} ({type(module).__name__}) has an instance-level forward "
                             f"({forward!r}) that tokred cannot patch under: tokred supports plain modules and "
                             "accelerate's hooks (device_map, accelerate.dispatch_model) on them. Remove it "
                             "before tokred.apply")


def replace_forward(module: nn.Module, forward: Callable) -> None:
    """Make ``module`` run ``forward``: as its instance ``forward`` or, under an accelerate hook,
    as the ``_old_forward`` the hook calls (the hook keeps running). Undone by :func:`restore_forward`."""
    slot = "_old_forward" if is_hooked(module) else "forward"
    module.__dict__["_tokred_replaced"] = (slot, module.__dict__.get(slot))
    module.__dict__[slot] = forward


def restore_forward(module: nn.Module) -> None:
    """Undo :func:`replace_forward`: the very object ``module`` had back (or none, as before)."""
    slot, previous = module.__dict__.pop("_tokred_replaced")
    if previous is None:
        del module.__dict__[slot]
    else:
        module.__dict__[slot] = previous


def patch_module(module: nn.Module, mixin: type, owner: object, attribute: str = "_tokred_adapter",
                 layer: int | None = None) -> None:
    """:func:`swap_class` ``module`` to ``mixin`` and give it what the mixin reads: its ``owner`` (the
    adapter or tower it calls, as ``module.<attribute>``) and, for a block, its index ``layer``
    (``module._tokred_layer``). Undone by :func:`unpatch_module`."""
    swap_class(module, mixin)
    setattr(module, attribute, owner)
    if layer is not None:
        module._tokred_layer = layer


def unpatch_module(module: nn.Module, attribute: str = "_tokred_adapter") -> None:
    """Undo :func:`patch_module`: the original class back, the owner and layer index gone."""
    restore_class(module)
    module.__dict__.pop(attribute, None)
    module.__dict__.pop("_tokred_layer", None)


def original_class(module: nn.Module) -> type:
    """The class ``module`` had before :func:`swap_class` (its own class when it is not patched)."""
    return getattr(type(module), "_tokred_original_class", type(module))


def original_method(module: nn.Module, name: str = "forward") -> Callable:
    """``module.<name>`` as its original class defines it, bound to ``module`` (tokred's mixin skipped)."""
    return getattr(original_class(module), name).__get__(module)


def inherits_method(module: nn.Module, owner: type, name: str) -> bool:
    """``module``'s original class runs ``owner.<name>`` unchanged (does not override it)."""
    return getattr(original_class(module), name, None) is getattr(owner, name)


# FLOPs shared by the vision families ----------------------------------------------------------
def block_costs(attention: nn.Module, mlp: nn.Module, extra_per_token: int = 0) -> LayerCosts:
    """Cost model of a transformer block: every ``nn.Linear`` in ``attention`` (plus
    ``extra_per_token``, e.g. a packed in-projection held as a bare parameter), QK^T and AV of
    ``attention.num_heads`` heads of ``attention.head_dim``, and every ``nn.Linear`` in ``mlp``."""
    return LayerCosts(per_attention_token=linear_flops(attention, 1) + extra_per_token,
                      per_token_pair=attention_flops(1, attention.num_heads, 1, 1, attention.head_dim),
                      per_mlp_token=linear_flops(mlp, 1))


def multihead_attention_flops(attn: nn.MultiheadAttention, batch: int, queries: int, keys: int) -> int:
    """FLOPs of ``nn.MultiheadAttention`` of ``queries`` query tokens over ``keys`` key/value tokens
    (an attention-pooling head: the in-projection is a bare parameter, ``out_proj`` a linear)."""
    embed = attn.embed_dim
    flops = 2 * batch * queries * embed * embed  # q projection
    flops += 2 * batch * keys * (attn.kdim + attn.vdim) * embed  # k and v projections
    flops += attention_flops(batch, attn.num_heads, queries, keys, attn.head_dim)
    return flops + linear_flops(attn.out_proj, batch * queries)


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
        if "family" in cls.__dict__:  # a concrete family: apply may choose it
            register_adapter(cls)

    def __init__(self, model: nn.Module, reducers: dict[str, Reducer]):
        check_forwards(model)
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

    def set_trace(self, trace: Trace) -> None:
        """Keep the trace of the forward that just ended (``on_end`` of :meth:`VisionStage.running`)."""
        self.trace = trace

    @property
    def vision_stage(self):
        """The :class:`~tokred.engine.VisionStage` running the vision encoder's blocks."""
        return self.stage

    def layer_costs(self, layer: int) -> LayerCosts:
        """FLOPs of vision block ``layer`` as a function of its token counts."""
        raise NotImplementedError(f"{self.family}: no per-block cost model")
