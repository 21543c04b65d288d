"""Hugging Face CLIP and SigLIP vision towers: ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``
and ``SiglipVisionModel`` (and, on transformers versions that have them, the inner
``CLIPVisionTransformer`` / ``SiglipVisionTransformer`` modules).

Hook point: every encoder layer (``CLIPEncoderLayer`` / ``SiglipEncoderLayer``), after attention
and before the MLP. Attention runs on ``F.scaled_dot_product_attention`` whatever the model's
``attn_implementation`` (proportional attention is an additive float mask) and also returns its
per-head queries and keys (merge metric and importance). Blocks where nothing changes run the layer's own
forward, so a reduction-free run is bit-identical to the unpatched model, eager or SDPA.

Outputs of a reduced forward:

- ``last_hidden_state`` has fewer tokens than the input had patches (``tokred.last_trace(model)``
  says how many patches each one stands for: ``trace.sizes``, ``trace.sources()``).
- CLIP: the class token is protected and stays at index 0, so ``pooler_output`` is still
  ``post_layernorm`` of the class token, and ``image_embeds`` its projection.
- SigLIP: the attention-pooling head weights every token by its size (log(size) added to the
  probe's attention logits), so a token standing for s patches counts as s copies of itself.
- ``output_hidden_states`` is supported: a tuple of tensors of decreasing length (entry 0 is
  the input of layer 0, entry i + 1 the output of layer i, after that layer's reduction).
- ``output_attentions``, an ``attention_mask`` and gradient checkpointing are refused with a
  ``ValueError`` while a reducer is applied.

Patching leaves the ``PreTrainedModel`` classes alone: transformers keys its output-capture
registry (``output_hidden_states``) on the model's class, so the tower's embeddings, encoder,
layers and pooling head are patched instead.

Reuse in vision-language models: :class:`VisionTower` holds the whole tower logic for one
tower module (the ``vision_tower`` of a LLaVA model is a ``CLIPVisionModel`` or
``SiglipVisionModel``). An adapter creates ``VisionTower(tower, reducer, on_end=...)`` in its
``__init__`` (validation only), calls ``patch()`` / ``unpatch()``, receives the trace of every
tower forward through ``on_end`` (also kept as ``tower.trace``) and adds the tower's FLOPs to its
report with ``tower.add_flops(trace, report)``.

A LLaVA's tower patched on its own (``tokred.apply(llava.model.vision_tower, ...)``) is reduced as
a tower: calling it gives reduced outputs, but the unpatched LLaVA's forward then gets fewer image
features than image placeholders (transformers raises "Image features and image tokens do not
match"). Give the vision-stage reducer to ``tokred.apply(llava, ...)`` instead; the two patches
refuse each other, and a projector or ``llm`` reducer applied to the tower says to apply it to the
whole model.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from tokred.adapters.base import (Adapter, block_costs, multihead_attention_flops, original_class, original_method,
                                  patch_module, unpatch_module)
from tokred.engine import VisionStage, weight_bias
from tokred.signals import Heads
from tokred.flops import FlopsReport, LayerCosts, add_block_flops, conv_flops, linear_flops
from tokred.reducers.base import Reducer
from tokred.trace import Trace


def _families() -> dict[str, tuple[type, ...]]:
    """The supported transformers classes by role, or {} when transformers is not installed."""
    try:
        from transformers.models.clip import modeling_clip as clip
        from transformers.models.siglip import modeling_siglip as siglip
    except ImportError:
        return {}
    towers = tuple(c for c in (clip.CLIPVisionModel, siglip.SiglipVisionModel,
                               getattr(clip, "CLIPVisionTransformer", None),
                               getattr(siglip, "SiglipVisionTransformer", None)) if c is not None)
    return {
        "models": (clip.CLIPVisionModelWithProjection, *towers),
        "encoders": (clip.CLIPEncoder, siglip.SiglipEncoder),
        "layers": (clip.CLIPEncoderLayer, siglip.SiglipEncoderLayer),
        "attentions": (clip.CLIPAttention, siglip.SiglipAttention),
        "mlps": (clip.CLIPMLP, siglip.SiglipMLP),
        "embeddings": (clip.CLIPVisionEmbeddings, siglip.SiglipVisionEmbeddings),
        "heads": (siglip.SiglipMultiheadAttentionPoolingHead,),
    }


def _exact(module: nn.Module, classes: tuple[type, ...]) -> bool:
    """``module`` is (apart from tokred's own patch) exactly one of ``classes``, whose forward we know."""
    return original_class(module) in classes


def find_tower(model: nn.Module) -> nn.Module:
    """The module holding ``embeddings`` and ``encoder`` of a CLIP / SigLIP vision model."""
    while not hasattr(model, "encoder") and isinstance(getattr(model, "vision_model", None), nn.Module):
        model = model.vision_model
    return model


# the attention branch, shared by CLIP and SigLIP ---------------------------------------------------

def attention_with_heads(attn: nn.Module, x: Tensor, bias: Tensor | None, need_heads: bool) -> tuple[Tensor, Heads | None]:
    """``CLIPAttention`` / ``SiglipAttention`` on SDPA with an additive bias (B, 1, 1, N), also
    returning its per-head queries and keys when ``need_heads``."""
    batch, num_tokens, _ = x.shape
    shape = (batch, num_tokens, -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=attn.dropout if attn.training else 0.0,
                                       scale=attn.scale)
    y = attn.out_proj(y.transpose(1, 2).reshape(batch, num_tokens, -1))
    return y, (Heads(q, k, attn.scale, bias) if need_heads else None)


def siglip_attention_pool(head: nn.Module, x: Tensor, size: Tensor) -> Tensor:
    """``SiglipMultiheadAttentionPoolingHead`` with every token of ``x`` (B, N, C) weighted by its
    size (B, N, 1): log(size) is added to the probe's attention logits, so a token of size s
    attends like s copies of itself."""
    probe = head.probe.expand(x.shape[0], -1, -1)
    bias = weight_bias(size[..., 0], head.attention.num_heads, probe.shape[1], x.dtype)
    y = head.attention(probe, x, x, attn_mask=bias, need_weights=False)[0]
    y = y + head.mlp(head.layernorm(y))
    return y[:, 0]


# mixins swapped into the tower's modules ----------------------------------------------------------

class _EmbeddingsMixin:
    def forward(self, pixel_values: Tensor, *args, **kwargs) -> Tensor:
        height, width = pixel_values.shape[-2:]
        self._tokred_tower.pending_grid = (height // self.patch_size, width // self.patch_size)
        return super().forward(pixel_values, *args, **kwargs)


class _EncoderMixin:
    def forward(self, inputs_embeds: Tensor, *args, **kwargs):
        with self._tokred_tower.running(inputs_embeds, kwargs):
            return super().forward(inputs_embeds, *args, **kwargs)


class _LayerMixin:
    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        tower = self._tokred_tower
        if tower.stage.run is None:  # called outside the encoder's forward
            return super().forward(hidden_states, attention_mask, **kwargs)
        return tower.layer_forward(self, hidden_states, attention_mask, kwargs)


class _HeadMixin:
    def forward(self, hidden_state: Tensor) -> Tensor:
        tower = self._tokred_tower
        tower.head_ran = True
        run = tower.stage.last_run
        if run is None or run.size is None or tuple(run.size.shape[:2]) != tuple(hidden_state.shape[:2]):
            return super().forward(hidden_state)
        return siglip_attention_pool(self, hidden_state, run.size)


class ProjectionRowsMixin:
    def forward(self, x: Tensor) -> Tensor:
        self._tokred_owner.projected_per_image = x.shape[:-1].numel() // x.shape[0]
        return super().forward(x)


# the reusable tower --------------------------------------------------------------------------------

class VisionTower:
    """Token reduction inside one CLIP / SigLIP vision tower.

    Args:
        tower: the module with ``embeddings`` and ``encoder`` (``CLIPVisionModel``,
            ``SiglipVisionModel``, or a ``*VisionTransformer`` on transformers versions that have one).
        reducer: the vision-stage reducer, or None to run unchanged while recording traces.
        stage: stage name used in the trace records and the FLOPs report.
        on_end: called with the :class:`~tokred.trace.Trace` at the end of every tower forward.
        replaces: the :class:`VisionTower` currently patched into ``tower`` that the caller will
            unpatch before :meth:`patch` (re-applying); any other existing patch is refused.
        part_of: the model ``tower`` belongs to, when tokred patches that model (a LLaVA), for messages.

    The constructor only validates (``TypeError`` / ``ValueError``, the model untouched).
    """

    def __init__(self, tower: nn.Module, reducer: Reducer | None, stage: str = "vision",
                 on_end: Callable[[Trace], None] | None = None, replaces: VisionTower | None = None,
                 part_of: nn.Module | None = None):
        families = _families()
        if not families:
            raise TypeError("the Hugging Face vision adapter needs transformers installed")
        name = type(tower).__name__
        embeddings, encoder = getattr(tower, "embeddings", None), getattr(tower, "encoder", None)
        if embeddings is None or encoder is None or not _exact(encoder, families["encoders"]):
            raise TypeError(f"{name} is not a CLIP / SigLIP vision tower (a module with `embeddings` and a "
                            "CLIPEncoder / SiglipEncoder `encoder`)")
        if not _exact(embeddings, families["embeddings"]):
            raise TypeError(f"{name} embeds patches with {type(embeddings).__name__}; tokred supports "
                            "CLIPVisionEmbeddings and SiglipVisionEmbeddings")
        for i, layer in enumerate(encoder.layers):
            if not _exact(layer, families["layers"]):
                raise TypeError(f"layer {i} of {name} is a {original_class(layer).__name__}; tokred supports "
                                "CLIPEncoderLayer and SiglipEncoderLayer")
            if not _exact(layer.self_attn, families["attentions"]) or not _exact(layer.mlp, families["mlps"]):
                raise TypeError(f"layer {i} of {name} has a replaced attention or MLP module "
                                f"({type(layer.self_attn).__name__}, {type(layer.mlp).__name__})")
        head = getattr(tower, "head", None) if getattr(tower, "use_head", False) else None
        if head is not None and not _exact(head, families["heads"]):
            raise TypeError(f"{name} pools with {type(head).__name__}; tokred supports "
                            "SiglipMultiheadAttentionPoolingHead")
        for module in [embeddings, encoder, *encoder.layers, *([head] if head is not None else [])]:
            owner = module.__dict__.get("_tokred_tower")
            if owner is not None and owner is not replaces and owner.part_of is None:
                raise ValueError(f"the vision tower of this model ({name}) is already patched by tokred on its own "
                                 "(tokred.apply(tower, ...)): tokred.remove(tower) first, then give the vision-stage "
                                 "reducer to tokred.apply on the whole model")
            if owner is not None and owner is not replaces:
                raise ValueError(f"this {name} is already patched by tokred as part of {owner.part_of}, whose "
                                 f"forward reduces it: to change its vision-stage reducer, tokred.apply it to the "
                                 f"{owner.part_of}; to patch the tower on its own, tokred.remove that model first")
        self.module, self.embeddings, self.encoder, self.head = tower, embeddings, encoder, head
        self.part_of = type(part_of).__name__ if part_of is not None else None
        self.layers = list(encoder.layers)
        self.num_prefix = 1 if hasattr(embeddings, "class_embedding") else 0
        self.stage = VisionStage(reducer, len(self.layers), self.num_prefix, stage)
        self.on_end = on_end
        self.trace: Trace | None = None
        self.pending_grid: tuple[int, int] | None = None  # set by the embeddings, read by the encoder
        self.patch_grid: tuple[int, int] | None = None  # grid of the patch embedding of the last forward
        self.head_ran = False  # whether the pooling head ran in the last forward

    # patching -------------------------------------------------------------------------------------
    def _patched_modules(self) -> list[tuple[nn.Module, type, int | None]]:
        """(module, mixin, layer index or None) of every module the tower patches."""
        modules = [(self.embeddings, _EmbeddingsMixin, None), (self.encoder, _EncoderMixin, None)]
        modules += [(layer, _LayerMixin, i) for i, layer in enumerate(self.layers)]
        if self.head is not None:
            modules.append((self.head, _HeadMixin, None))
        return modules

    def patch(self) -> None:
        for module, mixin, layer in self._patched_modules():
            patch_module(module, mixin, self, "_tokred_tower", layer)

    def unpatch(self) -> None:
        for module, _, _ in self._patched_modules():
            unpatch_module(module, "_tokred_tower")

    # forward --------------------------------------------------------------------------------------
    def _config_grid(self) -> tuple[int, int] | None:
        size, patch = self.embeddings.image_size, self.embeddings.patch_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        patch = patch if isinstance(patch, (tuple, list)) else (patch, patch)
        return size[0] // patch[0], size[1] // patch[1]

    def running(self, x: Tensor, kwargs: dict):
        """The bookkeeping of one forward of the encoder on ``x`` (B, N, C) with ``kwargs``
        (:meth:`VisionStage.running`); refuses what a reduction cannot serve."""
        reducer = self.stage.reducer
        if reducer is not None:
            config = getattr(self.module, "config", None)
            if kwargs.get("output_attentions", getattr(config, "output_attentions", False)):
                raise ValueError("output_attentions is not supported while tokred reduces tokens (tokred's "
                                 "attention runs on SDPA); call tokred.remove(model) to get attention maps")
            if self.encoder.training and any(layer.gradient_checkpointing for layer in self.layers):
                raise ValueError("gradient checkpointing cannot recompute layers whose tokens tokred reduces; "
                                 "disable it with model.gradient_checkpointing_disable()")
        grid, self.pending_grid = self.pending_grid, None
        self.patch_grid = grid
        if grid is None:
            grid = self._config_grid()
        if grid[0] * grid[1] + self.num_prefix != x.shape[1]:
            grid = self.patch_grid = None
        self.head_ran = False
        return self.stage.running(x.shape[0], grid, on_end=self._ended)

    def _ended(self, trace: Trace) -> None:
        self.trace = trace
        if self.on_end is not None:
            self.on_end(trace)

    def layer_forward(self, layer: nn.Module, x: Tensor, attention_mask: Tensor | None, kwargs: dict) -> Tensor:
        if attention_mask is not None and self.stage.reducer is not None:
            raise ValueError("tokred cannot reduce tokens when an attention mask is passed to the vision "
                             "encoder; call tokred.remove(model) to run with a mask")

        def attend(x, bias, need_heads):
            return attention_with_heads(layer.self_attn, layer.layer_norm1(x), bias, need_heads)

        return self.stage.block(
            layer._tokred_layer, x, attend,
            feed_forward=lambda x: layer.mlp(layer.layer_norm2(x)),
            original=lambda x: original_method(layer)(x, attention_mask, **kwargs))

    # FLOPs ----------------------------------------------------------------------------------------
    def add_flops(self, trace: Trace, report: FlopsReport) -> None:
        """Add the FLOPs of the tower forward that produced ``trace`` to ``report`` (its stage): its
        batch and token counts come from the trace (so a trace of one image counts one image), what
        ran (the patch grid, the pooling head) from the last forward."""
        stage, batch = self.stage.stage, trace.batch_size
        if self.patch_grid is not None:
            report.add(stage, "patch_embed", conv_flops(self.embeddings.patch_embedding, batch, self.patch_grid))
        add_block_flops(report, trace, self.layer_costs, stage)
        if self.head is not None and self.head_ran:
            report.add(stage, "head", self._head_flops(batch, trace.final_tokens))

    def layer_costs(self, layer: int) -> LayerCosts:
        encoder_layer = self.layers[layer]
        return block_costs(encoder_layer.self_attn, encoder_layer.mlp)

    def _head_flops(self, batch: int, tokens: int) -> int:
        """The attention-pooling head: its probe (one query) over ``tokens`` tokens, then its MLP."""
        return multihead_attention_flops(self.head.attention, batch, 1, tokens) + linear_flops(self.head.mlp, batch)


# the adapter ------------------------------------------------------------------------------------

class HFVisionAdapter(Adapter):
    family = ("Hugging Face CLIP / SigLIP vision towers (transformers CLIPVisionModel, "
              "CLIPVisionModelWithProjection, SiglipVisionModel)")
    stages = ("vision",)
    provides_heads = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if "transformers" not in sys.modules:  # no transformers model exists, and importing it is slow
            return False
        families = _families()
        return bool(families) and isinstance(model, families["models"])

    def __init__(self, model: nn.Module, reducers: dict[str, Reducer]):
        super().__init__(model, reducers)
        current = model.__dict__.get("_tokred_adapter")
        self.tower = VisionTower(find_tower(model), reducers.get("vision"), on_end=self.set_trace,
                                 replaces=current.tower if isinstance(current, HFVisionAdapter) else None)
        projection = getattr(model, "visual_projection", None)
        self.projection = projection if isinstance(projection, nn.Linear) else None
        self.projected_per_image: int | None = None  # rows per image the projection ran on, last forward
        self.num_prefix = self.tower.num_prefix

    def set_trace(self, trace: Trace) -> None:
        self.trace = trace
        self.projected_per_image = None

    @property
    def stage(self) -> VisionStage:
        return self.tower.stage

    def patch(self) -> None:
        self.tower.patch()
        if self.projection is not None:
            patch_module(self.projection, ProjectionRowsMixin, self, "_tokred_owner")
        self.model._tokred_adapter = self

    def unpatch(self) -> None:
        self.tower.unpatch()
        if self.projection is not None:
            unpatch_module(self.projection, "_tokred_owner")
        del self.model._tokred_adapter

    @property
    def vision_stage(self) -> VisionStage:
        return self.tower.stage

    def layer_costs(self, layer: int) -> LayerCosts:
        return self.tower.layer_costs(layer)

    def flops(self, trace: Trace) -> FlopsReport:
        report = FlopsReport()
        self.tower.add_flops(trace, report)
        if self.projection is not None and self.projected_per_image is not None:
            report.add("vision", "projection", linear_flops(self.projection, trace.batch_size * self.projected_per_image))
        return report
