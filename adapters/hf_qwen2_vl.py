"""Hugging Face Qwen2-VL and Qwen2.5-VL (transformers ``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``), images.

Stages:

- ``projector``: after the patch merger, on each image's merged tokens, with its (rows, cols)
  grid of merge units (read from the prompt's M-RoPE positions, so it works inside ``generate``,
  which pre-encodes the images and drops ``image_grid_thw`` from the prefill call).
- ``llm``: before decoder layer K, in the core language-model engine.
- ``vision`` is refused: the vision encoder runs all images as one packed sequence
  (``cu_seqlens``, windows in 2.5-VL) and its merger needs every 2 x 2 unit whole.

Positions are Qwen's 3-D M-RoPE (t, h, w) per token (:class:`tokred.decoder.MRoPE`): kept tokens
keep their original positions (``positions="keep"``, the default here); ``"renumber"`` is refused.
A prompt with images must come with ``mm_token_type_ids`` (the processor returns it): without it
transformers silently falls back to 1-D positions, so tokred raises instead. After a reduced
prefill, ``model.model.rope_deltas`` is set so that the next position is the original one.
"""
from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from tokred.adapters.vlm import VisionLanguageAdapter
from tokred.decoder import MRoPE
from tokred.flops import FlopsReport, attention_flops, linear_flops
from tokred.reducers.base import Reducer
from tokred.signals import Layout


def _families() -> tuple[type, ...]:
    """The supported model classes, or () without transformers."""
    try:
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
    except ImportError:
        return ()
    return Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration


class Qwen2VLAdapter(VisionLanguageAdapter):
    family = ("Hugging Face Qwen2-VL / Qwen2.5-VL (transformers Qwen2VLForConditionalGeneration, "
              "Qwen2_5_VLForConditionalGeneration)")
    stages = ("vision", "projector", "llm")
    scheme = MRoPE()

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return "transformers" in sys.modules and isinstance(model, _families())

    def __init__(self, model: nn.Module, reducers: dict[str, Reducer]):
        name = type(model).__name__
        if reducers.get("vision") is not None:
            raise ValueError(f"{name}'s vision encoder runs every image as one packed sequence and its patch merger "
                             "needs each 2 x 2 unit whole, so tokred does not reduce inside it: put the reducer at "
                             "the 'projector' stage (after the merger) or the 'llm' stage instead")
        super().__init__(model, reducers, model.model.language_model)
        self.visual = model.model.visual
        self.merge = self.visual.spatial_merge_size
        self.vision_runs: list[tuple[int, list[int]]] = []  # per vision-encoder call: (patches, chunk lengths per block)
        self._hooks: list = []

    # patching -------------------------------------------------------------------------------------
    def patch(self) -> None:
        self._hooks = [self.visual.register_forward_pre_hook(self._vision_starts)]
        self._hooks += [block.register_forward_pre_hook(self._block_starts, with_kwargs=True)
                        for block in self.visual.blocks]
        super().patch()

    def unpatch(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        super().unpatch()

    def _vision_starts(self, module, args) -> None:
        self.vision_runs = [(int(args[0].shape[0]), [])]

    def _block_starts(self, module, args, kwargs) -> None:
        self.vision_runs[-1][1].append(kwargs["cu_seqlens"].diff().tolist())

    def output_class(self) -> type:
        return sys.modules[type(self.model).__module__].MultimodalCausalLMOutputWithPast

    # the family's hooks ----------------------------------------------------------------------------
    def _check_call(self, call: dict) -> None:
        if call.get("pixel_values_videos") is not None:
            raise ValueError("tokred does not reduce Qwen2-VL video inputs yet; call tokred.remove(model)")

    def _encode_images(self, call: dict):
        if call.get("image_grid_thw") is None:
            raise ValueError("Qwen2-VL needs image_grid_thw with pixel_values (the processor returns both)")
        return self.model.model.get_image_features(call["pixel_values"], call["image_grid_thw"], return_dict=True)

    def _prompt_positions(self, call: dict, valid: Tensor) -> Tensor:
        """(B, L, 3) M-RoPE positions of the prompt: generate's (4, B, L) rows 1-3, the caller's
        (3, B, L), or Qwen's own ``get_rope_index`` on the full prompt."""
        if call.get("mm_token_type_ids") is None:
            raise ValueError("a Qwen2-VL prompt with images needs mm_token_type_ids (the processor returns it; "
                             "1 marks image placeholders): without it transformers silently uses 1-D positions")
        positions = call.get("position_ids")
        if positions is None:
            if call.get("image_grid_thw") is None:
                raise ValueError("Qwen2-VL needs image_grid_thw (or 3-D position_ids) to place the image tokens")
            positions, _ = self.model.model.get_rope_index(call["input_ids"], call["mm_token_type_ids"],
                                                            image_grid_thw=call["image_grid_thw"],
                                                            attention_mask=call["attention_mask"])
        elif positions.dim() == 3 and positions.shape[0] == 4:
            positions = positions[1:]  # generate prepends the 1-D text row
        elif positions.dim() != 3 or positions.shape[0] != 3:
            raise ValueError(f"Qwen2-VL position_ids must be (3, B, L) or (4, B, L) with images, got "
                             f"{tuple(positions.shape)}")
        return positions.permute(1, 2, 0)

    def _visual_items(self, call: dict, encoded):
        features = list(encoded.pooler_output)
        counts = [f.shape[0] for f in features]
        positions = self._prompt_positions(call, call["attention_mask"].bool() if call["attention_mask"] is not None
                                           else torch.ones_like(call["input_ids"], dtype=torch.bool))
        layouts = []
        for sample, slots in self._placeholders(call["input_ids"], counts):
            p = positions[sample, slots]  # (n, 3): the image's (t, h, w)
            frames = int(p[:, 0].unique().numel())
            rows, cols = (int(p[:, a].max() - p[:, a].min()) + 1 for a in (1, 2))
            layouts.append(Layout(frames, rows, cols) if frames * rows * cols == len(slots) else None)
        return features, counts, layouts

    def _after_prefill(self, next_position: Tensor, kept_length: Tensor) -> None:
        self.model.model.rope_deltas = (next_position - kept_length)[:, None]

    # FLOPs ------------------------------------------------------------------------------------------
    def add_vision_flops(self, report: FlopsReport) -> None:
        """The vision encoder (patch embedding, every block with attention over the chunks it really
        ran — whole images, or 2.5-VL's windows —, MLP) and the patch merger of the last encoding."""
        for patches, chunks_per_block in self.vision_runs:
            embed = self.visual.patch_embed.proj
            report.add("vision", "patch_embed", 2 * patches * embed.weight[0].numel() * embed.out_channels)
            for i, (block, chunks) in enumerate(zip(self.visual.blocks, chunks_per_block)):
                attn = block.attn
                head_dim = attn.qkv.out_features // 3 // attn.num_heads
                core = sum(attention_flops(1, attn.num_heads, n, n, head_dim) for n in chunks)
                report.add("vision", f"block{i}", linear_flops(attn, patches) + core + linear_flops(block.mlp, patches))
            report.add("projector", "merger", linear_flops(self.visual.merger, patches // self.merge ** 2))
