"""Hugging Face LLaVA-family vision-language models (transformers 5.x):
``LlavaForConditionalGeneration`` (LLaVA-1.5), ``LlavaNextForConditionalGeneration`` (AnyRes crops,
``image_newline`` tokens) and ``LlavaOnevisionForConditionalGeneration`` (images and videos).

Stages:

- ``vision``: inside the CLIP / SigLIP tower (the :class:`~tokred.adapters.hf_vision.VisionTower`
  of the vision adapter), LLaVA-1.5 only: LLaVA-NeXT and OneVision lay the tower's output out on
  the crop grid (AnyRes packing, newline tokens), which needs every patch. Each image's remaining
  tokens fill the first slots of its placeholder run; the run's other placeholders are dropped.
- ``projector``: on each image's projected visual tokens (``plan_images``), before the language model.
  A LLaVA-OneVision video (``pixel_values_videos``, (videos, frames, 3, H, W)) is one visual item:
  its frames' pooled tokens (frame by frame, each ceil(side / 2)^2 after the model's 2 x 2 bilinear
  pooling) with layout ``(frames, ceil(side / 2), ceil(side / 2))``, and the one ``image_newline``
  after them, protected (never removed or merged, except by an ``llm`` reducer that
  ``counts_protected``: HoliTom's inner stage). Reducers that ``needs_tower_attention`` get
  each video token's attention received in the tower's last used layer (:meth:`LlavaAdapter.tower_attention`).
- ``llm``: before decoder layer K, in the core language-model engine (:mod:`tokred.decoder`).

What all VLM families share (placeholders, the projector stage, the hand-off to the core
language-model engine, outputs, trace, FLOPs of the language model) is
:class:`~tokred.adapters.vlm.VisionLanguageAdapter`. Positions are 1-D: ``positions="keep"``
(original ids with gaps) or ``"renumber"`` (contiguous; the default of the projector reducers here).

Reducers decide on the prompt only. ``generate(use_cache=False)`` knows the prompt's length
(:class:`~tokred.adapters.vlm.PatchedGenerate`); when you re-run a sequence that includes generated
tokens yourself, pass ``prompt_length=`` (the prompt's length) to the model call so the decisions
match the cached run.
"""
from __future__ import annotations

import inspect
import math
import sys

import torch
from torch import Tensor, nn

from tokred.adapters.hf_vision import VisionTower
from tokred.adapters.vlm import VisionLanguageAdapter, VisualItem
from tokred.flops import FlopsReport, LayerCosts, linear_flops
from tokred.reducers.base import Reducer, kept_count
from tokred.reducers.baselines import Pool
from tokred.signals import Heads, Layout
from tokred.trace import Trace

#: the image inputs ``get_image_features`` of the three families accept
_IMAGE_KWARGS = ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio",
                 "batch_num_images")


def _families() -> dict[str, type]:
    """Supported model classes by name, or {} without transformers."""
    try:
        from transformers import (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
                                  LlavaOnevisionForConditionalGeneration)
    except ImportError:
        return {}
    return {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration,
            "llava_onevision": LlavaOnevisionForConditionalGeneration}


class LlavaAdapter(VisionLanguageAdapter):
    family = ("Hugging Face LLaVA family (transformers LlavaForConditionalGeneration, "
              "LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration)")
    stages = ("vision", "projector", "llm")
    provides_heads = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if "transformers" not in sys.modules:
            return False
        return isinstance(model, tuple(_families().values()))

    def __init__(self, model: nn.Module, reducers: dict[str, Reducer]):
        name = type(model).__name__
        self.kind = next(kind for kind, cls in _families().items() if isinstance(model, cls))
        base = model.model
        if reducers.get("vision") is not None and self.kind != "llava":
            raise ValueError(f"{name} packs the vision tower's patches on the AnyRes crop grid (with newline tokens), "
                             "which needs every patch: put the reducer at the 'projector' or 'llm' stage instead")
        super().__init__(model, reducers, base.language_model)
        current = model.__dict__.get("_tokred_adapter")
        self.tower = VisionTower(base.vision_tower, reducers.get("vision"), on_end=self._tower_done,
                                 replaces=current.tower if isinstance(current, LlavaAdapter) else None, part_of=model)
        projector = reducers.get("projector")
        if isinstance(projector, Pool) and self.image_grid() is None and self.kind != "llava_onevision":
            raise ValueError(f"Pool at the projector stage needs each image's visual tokens to form the patch grid; "
                             f"{name}'s do not (AnyRes crops, newline tokens or the class token): use Random or "
                             "DivPrune there")
        if isinstance(getattr(projector, "keep", None), int) and self.image_grid() is not None:
            rows, cols = self.image_grid()
            kept_count(projector.keep, rows * cols)  # a count larger than an image's tokens
        if getattr(projector, "needs_tower_attention", False):
            layer = self.config.vision_feature_layer
            if self.kind != "llava_onevision" or not isinstance(layer, int) or layer % (len(self.tower.layers) + 1) == 0:
                raise ValueError(f"{type(projector).__name__} needs the vision tower's attention, which tokred provides "
                                 "for LLaVA-OneVision videos with one vision_feature_layer after the embeddings; "
                                 f"{name} has none: use a reducer that needs no tower attention (DivPrune, Random)")
            self.attention_layer = self.tower.layers[layer % (len(self.tower.layers) + 1) - 1]
        self.projector = base.multi_modal_projector
        self._hooks: list = []

    # patching -------------------------------------------------------------------------------------
    def patch(self) -> None:
        self.tower.patch()
        self._hooks = [self.projector.register_forward_hook(self._projected)]
        super().patch()

    def unpatch(self) -> None:
        self.tower.unpatch()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        super().unpatch()

    # an encoder call's runs (:class:`~tokred.adapters.vlm.Encoding`): [the tower's trace, the rows its projector ran on]
    def _tower_done(self, trace: Trace) -> None:
        if self.encoding is not None:
            self.encoding.runs.append([trace, 0])

    def _projected(self, module, args, output) -> None:
        if self.encoding is not None and self.encoding.runs:
            self.encoding.runs[-1][1] = args[0].shape[:-1].numel()

    def _vision_trace(self, encodings) -> Trace | None:
        runs = [run for encoding in encodings for run in encoding.runs]
        return runs[-1][0] if runs else None

    def tower_attention(self, hidden: Tensor) -> Tensor:
        """(B, N) mean attention each token receives in the tower's last used layer (averaged over
        heads and over every query row), from that layer's input ``hidden`` (B, N, C): its queries
        and keys are recomputed (``layer_norm1``, ``q_proj``, ``k_proj``) and the softmax is taken
        over chunks of queries (:meth:`~tokred.signals.Heads.received`), so the tower keeps its
        fused attention and no N x N matrix exists. Adds the recomputation to the open encoding's
        ``attention_flops``.

        The one source of the tower-attention signal of the LLaVA family (VisionZip, HoliTom)."""
        layer = self.attention_layer
        attn = layer.self_attn
        x = layer.layer_norm1(hidden)
        shape = (*x.shape[:2], -1, attn.head_dim)
        heads = Heads(attn.q_proj(x).view(shape).transpose(1, 2), attn.k_proj(x).view(shape).transpose(1, 2),
                      attn.scale, None)
        rows = x.shape[0] * x.shape[1]
        self.encoding.attention_flops += linear_flops(attn.q_proj, rows) + linear_flops(attn.k_proj, rows) + heads.flops()
        return heads.received()

    def received_attention(self, layer_call: tuple[tuple, dict], call: tuple[tuple, dict]) -> list[Tensor]:
        """Per OneVision video (frames x side^2,): :meth:`tower_attention` of its frames, the class
        token dropped with strategy "default", pooled like the features by the model's own
        ``apply_pooling`` (bilinear 2 x 2)."""
        (layer_args, layer_kwargs), (args, kwargs) = layer_call, call
        hidden = layer_args[0] if layer_args else layer_kwargs["hidden_states"]
        videos, frames = kwargs.get("pixel_values_videos", args[0] if args else None).shape[:2]
        received = self.tower_attention(hidden)  # (videos * frames, N)
        if self.config.vision_feature_select_strategy == "default":
            received = received[:, 1:]
        return list(self.model.model.apply_pooling(received[..., None])[..., 0].reshape(videos, -1))

    @property
    def vision_stage(self):
        return self.tower.stage

    def layer_costs(self, layer: int) -> LayerCosts:
        return self.tower.layer_costs(layer)

    def image_grid(self) -> tuple[int, int] | None:
        """(rows, cols) of an image's visual tokens when they form the patch grid (LLaVA-1.5, class token dropped)."""
        if self.kind != "llava" or self.config.vision_feature_select_strategy != "default":
            return None
        if not isinstance(self.config.vision_feature_layer, int):
            return None
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    def output_class(self) -> type:
        module = sys.modules[type(self.model).__module__]
        return getattr(module, type(self.model).__name__.replace("ForConditionalGeneration", "CausalLMOutputWithPast"))

    # the family's hooks ----------------------------------------------------------------------------
    def _encode_images(self, call: dict):
        """``get_image_features`` of the model on the call's images (its ``pooler_output``: per image features)."""
        base = self.model.model
        accepted = inspect.signature(base.get_image_features).parameters
        image_kwargs = {k: call[k] for k in _IMAGE_KWARGS if k in accepted and call.get(k) is not None}
        for name in ("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio"):
            if name in accepted and name not in image_kwargs and hasattr(self.config, name):
                image_kwargs[name] = getattr(self.config, name)
        return base.get_image_features(pixel_values=call["pixel_values"], return_dict=True, **image_kwargs)

    def _encode_videos(self, call: dict):
        """``get_video_features`` of the model on the call's videos (LLaVA-OneVision)."""
        if self.kind != "llava_onevision":
            raise ValueError(f"{type(self.model).__name__} takes no video inputs")
        options = {name: call[name] if call.get(name) is not None else getattr(self.config, name)
                   for name in ("vision_feature_layer", "vision_feature_select_strategy")}
        return self.model.model.get_video_features(pixel_values_videos=call["pixel_values_videos"], return_dict=True,
                                                   **options)

    def _visual_items(self, call: dict, encoded: dict) -> list[VisualItem]:
        items = []
        if "image" in encoded:
            features = list(encoded["image"].pooler_output)
            counts, sources = [f.shape[0] for f in features], [None] * len(features)
            if self.reducers.get("vision") is not None:
                features, counts, sources = self._surviving_tower_tokens(features, self.encoding_of(encoded, "image"))
            grid = self.image_grid()
            layout = Layout(1, *grid) if grid is not None else None
            items += [VisualItem("image", f, n, layout if layout is not None and f.shape[0] == layout.num_tokens
                                 else None, sources=s) for f, n, s in zip(features, counts, sources)]
        if "video" in encoded:
            items += self._video_items(encoded["video"])
        return items

    def _video_items(self, encoded) -> list[VisualItem]:
        """One item per OneVision video: its F frames' pooled tokens with layout (F, side, side), and
        the ``image_newline`` after them protected; the tower attention when it was computed."""
        vision = self.config.vision_config
        side = math.ceil(vision.image_size // vision.patch_size / 2)  # the model's 2 x 2 bilinear pooling
        pooled = encoded.pooler_output  # (videos, F * side^2 + 1, D)
        frames, rest = divmod(pooled.shape[1] - 1, side * side)
        if rest:
            raise ValueError(f"a LLaVA-OneVision video should give frames x {side * side} pooled tokens and one "
                             f"newline, got {pooled.shape[1]} tokens per video")
        received = getattr(encoded, "tokred_received", None)
        return [VisualItem("video", video[:-1], video.shape[0], Layout(frames, side, side), protected=video[-1:],
                           received=None if received is None else received[v])
                for v, video in enumerate(pooled)]

    def _surviving_tower_tokens(self, features: list[Tensor], encoding) -> tuple[list[Tensor], list[int], list]:
        """With a vision-stage reducer: each image's features cut to the tokens that survived in the
        tower (a batch is padded to its widest image; padding rows are no visual tokens), the
        placeholders each image has (its unreduced token count), and per image the row of its cut
        features covering each unreduced token (``VisualItem.sources``; None if the tower reduced nothing
        before the feature layer). ``encoding``: the images' :class:`~tokred.adapters.vlm.Encoding`, with the
        tower's trace."""
        if encoding is None or not encoding.runs:
            raise ValueError("with a vision-stage reducer tokred needs the image features encoded by the patched "
                             "model (pixel_values, or mm_encoder_outputs from its get_image_features)")
        trace, tower_layers = encoding.runs[-1][0], len(self.tower.layers)
        class_token = int(self.config.vision_feature_select_strategy == "default")
        full = trace.layers[0].tokens_in - class_token
        if len(features) != trace.batch_size:
            raise ValueError(f"the language model received the features of {len(features)} images but the vision "
                             f"tower ran on {trace.batch_size}; with a vision-stage reducer generate() cannot "
                             "expand images for beam search or num_return_sequences > 1 (it counts placeholders "
                             "against the reduced features): use num_beams=1, or reduce at the projector stage")
        feature_layer = self.config.vision_feature_layer % (tower_layers + 1)  # hidden_states index
        if feature_layer == 0:
            return features, [full] * len(features), [None] * len(features)
        source_map = trace.source_maps[feature_layer - 1]  # (B, patches + class) -> token, -1 pruned
        alive = torch.zeros(source_map.shape[0], features[0].shape[0] + class_token, dtype=torch.bool,
                            device=source_map.device)
        alive.scatter_(1, source_map.clamp(min=0), source_map >= 0)
        alive = alive[:, class_token:]
        row = alive.long().cumsum(dim=1) - 1  # of every tower token in its image's cut features
        token = source_map[:, class_token:] - class_token  # no patch merges into the protected class token
        sources = torch.where(token >= 0, row.gather(1, token.clamp(min=0)), -1)
        return [f[a] for f, a in zip(features, alive)], [full] * len(features), list(sources)

    # FLOPs ------------------------------------------------------------------------------------------
    def add_vision_flops(self, report: FlopsReport) -> None:
        """Every tower run behind the last prefill's features (its images, its videos) with its projector
        rows, and the recomputed tower attention."""
        for encoding in self.encodings:
            for trace, rows in encoding.runs:
                self.tower.add_flops(trace, report)
                report.add("projector", "projector", linear_flops(self.projector, rows))
            if encoding.attention_flops:
                report.add("projector", "tower_attention", encoding.attention_flops)

