"""Hugging Face LLaVA-family vision-language models (transformers 5.x):
``LlavaForConditionalGeneration`` (LLaVA-1.5), ``LlavaNextForConditionalGeneration`` (AnyRes crops,
``image_newline`` tokens) and ``LlavaOnevisionForConditionalGeneration`` (images).

Stages:

- ``vision``: inside the CLIP / SigLIP tower (the :class:`~tokred.adapters.hf_vision.VisionTower`
  of the vision adapter), LLaVA-1.5 only: LLaVA-NeXT and OneVision lay the tower's output out on
  the crop grid (AnyRes packing, newline tokens), which needs every patch. Each image's remaining
  tokens fill the first slots of its placeholder run; the run's other placeholders are dropped.
- ``projector``: on each image's projected visual tokens (``plan_images``), before the language model.
- ``llm``: before decoder layer K, in the core language-model engine (:mod:`tokred.decoder`).

What all VLM families share (placeholders, the projector stage, the hand-off to the core
language-model engine, outputs, trace, FLOPs of the language model) is
:class:`~tokred.adapters.vlm.VisionLanguageAdapter`. Positions are 1-D: ``positions="keep"``
(original ids with gaps) or ``"renumber"`` (contiguous; the default of the projector reducers here).

Reducers decide on the prompt only. When a sequence that includes generated tokens is re-run
without a cache, pass ``prompt_length=`` (the prompt's length) to the model call so the decisions
match the cached run.
"""
from __future__ import annotations

import inspect
import sys

import torch
from torch import Tensor, nn

from tokred.adapters.base import restore_class, swap_class
from tokred.adapters.hf_vision import ProjectionRowsMixin, VisionTower
from tokred.adapters.vlm import VisionLanguageAdapter
from tokred.flops import FlopsReport, LayerCosts, linear_flops
from tokred.reducers.base import Reducer, kept_count
from tokred.reducers.baselines import Pool
from tokred.signals import Layout
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
                                 replaces=current.tower if isinstance(current, LlavaAdapter) else None)
        projector = reducers.get("projector")
        if isinstance(projector, Pool) and self.image_grid() is None:
            raise ValueError(f"Pool at the projector stage needs each image's visual tokens to form the patch grid; "
                             f"{name}'s do not (AnyRes crops, newline tokens or the class token): use Random or "
                             "DivPrune there")
        if isinstance(getattr(projector, "keep", None), int) and self.image_grid() is not None:
            rows, cols = self.image_grid()
            kept_count(projector.keep, rows * cols)  # a count larger than an image's tokens
        self.projector = base.multi_modal_projector
        self.projected_rows = 0  # visual features the projector ran on in the last prefill

    # patching -------------------------------------------------------------------------------------
    def patch(self) -> None:
        self.tower.patch()
        swap_class(self.projector, ProjectionRowsMixin)
        self.projector._tokred_owner = self
        super().patch()

    def unpatch(self) -> None:
        self.tower.unpatch()
        restore_class(self.projector)
        del self.projector._tokred_owner
        super().unpatch()

    def _tower_done(self, trace: Trace) -> None:
        self.vision_trace = trace

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
    def _check_call(self, call: dict) -> None:
        if call.get("pixel_values_videos") is not None:
            raise ValueError("tokred does not reduce video inputs of LLaVA-OneVision yet; call tokred.remove(model)")

    def _encode_images(self, call: dict):
        """``get_image_features`` of the model on the call's images (its ``pooler_output``: per image features)."""
        base = self.model.model
        accepted = inspect.signature(base.get_image_features).parameters
        image_kwargs = {k: call[k] for k in _IMAGE_KWARGS if k in accepted and call.get(k) is not None}
        for name in ("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio"):
            if name in accepted and name not in image_kwargs and hasattr(self.config, name):
                image_kwargs[name] = getattr(self.config, name)
        return base.get_image_features(pixel_values=call["pixel_values"], return_dict=True, **image_kwargs)

    def _visual_items(self, call: dict, encoded):
        features = list(encoded.pooler_output)
        counts = [f.shape[0] for f in features]
        if self.reducers.get("vision") is not None and self.vision_trace is not None:
            features, counts = self._surviving_tower_tokens(features)
        grid = self.image_grid()
        layout = Layout(1, *grid) if grid is not None else None
        return features, counts, [layout if layout is not None and f.shape[0] == layout.num_tokens else None
                                  for f in features]

    def _surviving_tower_tokens(self, features: list[Tensor]) -> tuple[list[Tensor], list[int]]:
        """With a vision-stage reducer: each image's features cut to the tokens that survived in the
        tower (a batch is padded to its widest image; padding rows are no visual tokens), and the
        placeholders each image has (its unreduced token count)."""
        trace, tower_layers = self.vision_trace, len(self.tower.layers)
        class_token = int(self.config.vision_feature_select_strategy == "default")
        full = trace.layers[0].tokens_in - class_token
        if len(features) != trace.batch_size:
            raise ValueError(f"the language model received the features of {len(features)} images but the vision "
                             f"tower ran on {trace.batch_size}; with a vision-stage reducer generate() cannot "
                             "expand images for beam search or num_return_sequences > 1 (it counts placeholders "
                             "against the reduced features): use num_beams=1, or reduce at the projector stage")
        feature_layer = self.config.vision_feature_layer % (tower_layers + 1)  # hidden_states index
        if feature_layer == 0:
            return features, [full] * len(features)
        source_map = trace.source_maps[feature_layer - 1]  # (B, patches + class) -> token, -1 pruned
        alive = torch.zeros(source_map.shape[0], features[0].shape[0] + class_token, dtype=torch.bool,
                            device=source_map.device)
        alive.scatter_(1, source_map.clamp(min=0), source_map >= 0)
        alive = alive[:, class_token:]
        return [f[a] for f, a in zip(features, alive)], [full] * len(features)

    # FLOPs ------------------------------------------------------------------------------------------
    def add_vision_flops(self, report: FlopsReport) -> None:
        if self.vision_trace is not None:
            self.tower.add_flops(self.vision_trace, report)
            report.add("projector", "projector", linear_flops(self.projector, self.projected_rows))
