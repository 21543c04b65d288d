"""Hugging Face Qwen2-VL and Qwen2.5-VL (transformers ``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``), images and videos.

Stages:

- ``projector``: after the patch merger, on each image's and each video's merged tokens, with its
  layout ``(frames, rows, cols)`` of merge units (frames: the video's temporal patches, ``t`` of
  ``video_grid_thw``; 1 for an image), read from the prompt's M-RoPE positions, so it works inside
  ``generate``, which pre-encodes images and videos and drops ``image_grid_thw`` /
  ``video_grid_thw`` from the prefill call. Videos of different lengths in one batch are fine
  (``pixel_values_videos`` is packed). Reducers that need the tower's attention get it for images
  and videos (:meth:`Qwen2VLAdapter.received_attention`: the last block's attention, recomputed,
  per merge unit).
- ``llm``: before decoder layer K, in the core language-model engine.
- ``vision`` is refused: the vision encoder runs all images as one packed sequence
  (``cu_seqlens``, windows in 2.5-VL) and its merger needs every 2 x 2 unit whole.

Positions are Qwen's 3-D M-RoPE (t, h, w) per token (:class:`tokred.decoder.MRoPE`): kept tokens
keep their original positions (``positions="keep"``, the default here); ``"renumber"`` is refused.
A prompt with images or videos must come with ``mm_token_type_ids`` (the processor returns it): without it
transformers silently falls back to 1-D positions, so tokred raises instead. After a reduced
prefill, ``model.model.rope_deltas`` is set so that the next position is the original one.
"""
from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from tokred.adapters.vlm import VisionLanguageAdapter, VisualItem
from tokred.decoder import CompatibilityError, MRoPE
from tokred.flops import FlopsReport, attention_flops, linear_flops
from tokred.reducers.base import Reducer
from tokred.signals import Heads, Layout


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
    attention_modalities = ("image", "video")

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
        if getattr(reducers.get("projector"), "needs_tower_attention", False):
            self.attention_layer = self.visual.blocks[-1]
            self._rotate = getattr(sys.modules[type(self.visual).__module__], "apply_rotary_pos_emb_vision", None)
            if self._rotate is None:
                raise CompatibilityError(f"{type(self.visual).__module__} has no apply_rotary_pos_emb_vision, which "
                                         "tokred's tower attention of Qwen2-VL videos uses")
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

    # an encoder call's runs (:class:`~tokred.adapters.vlm.Encoding`): (patches, chunk lengths per block)
    def _vision_starts(self, module, args) -> None:
        if self.encoding is not None:
            self.encoding.runs.append((int(args[0].shape[0]), []))

    def _block_starts(self, module, args, kwargs) -> None:
        if self.encoding is not None and self.encoding.runs:
            self.encoding.runs[-1][1].append(kwargs["cu_seqlens"].diff().tolist())

    def output_class(self) -> type:
        return sys.modules[type(self.model).__module__].MultimodalCausalLMOutputWithPast

    # the family's hooks ----------------------------------------------------------------------------
    def _encode_images(self, call: dict):
        if call.get("image_grid_thw") is None:
            raise ValueError("Qwen2-VL needs image_grid_thw with pixel_values (the processor returns both)")
        return self.model.model.get_image_features(call["pixel_values"], call["image_grid_thw"], return_dict=True)

    def _encode_videos(self, call: dict):
        if call.get("video_grid_thw") is None:
            raise ValueError("Qwen2-VL needs video_grid_thw with pixel_values_videos (the processor returns both)")
        return self.model.model.get_video_features(call["pixel_values_videos"], call["video_grid_thw"],
                                                   return_dict=True)

    def _prompt_positions(self, call: dict, valid: Tensor) -> Tensor:
        """(B, L, 3) M-RoPE positions of the prompt: generate's (4, B, L) rows 1-3, the caller's
        (3, B, L), or Qwen's own ``get_rope_index`` on the full prompt."""
        if call.get("mm_token_type_ids") is None:
            raise ValueError("a Qwen2-VL prompt with images or videos needs mm_token_type_ids (the processor returns "
                             "it; 1 marks image, 2 video placeholders): without it transformers silently uses 1-D "
                             "positions")
        positions = call.get("position_ids")
        if positions is None:
            if call.get("image_grid_thw") is None and call.get("video_grid_thw") is None:
                raise ValueError("Qwen2-VL needs image_grid_thw / video_grid_thw (or 3-D position_ids) to place the "
                                 "image and video tokens")
            grids = {k: call[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
                     if call.get(k) is not None}
            positions, _ = self.model.model.get_rope_index(call["input_ids"], call["mm_token_type_ids"],
                                                            attention_mask=call["attention_mask"], **grids)
        elif positions.dim() == 3 and positions.shape[0] == 4:
            positions = positions[1:]  # generate prepends the 1-D text row
        elif positions.dim() != 3 or positions.shape[0] != 3:
            raise ValueError(f"Qwen2-VL position_ids must be (3, B, L) or (4, B, L) with images, got "
                             f"{tuple(positions.shape)}")
        return positions.permute(1, 2, 0)

    def _visual_items(self, call: dict, encoded: dict) -> list[VisualItem]:
        """Images, then videos, each with its layout: (rows, cols) from the h and w spans of its
        M-RoPE positions, frames = tokens / (rows x cols) (a video's time positions may be spaced or,
        in Qwen2.5-VL, shared by frames, so they are not counted); each with its tower attention
        when it was computed."""
        items = []
        for modality in ("image", "video"):
            if modality in encoded:
                received = getattr(encoded[modality], "tokred_received", None)
                items += [VisualItem(modality, f, f.shape[0], received=None if received is None else received[i])
                          for i, f in enumerate(encoded[modality].pooler_output)]
        positions = self._prompt_positions(call, call["attention_mask"].bool() if call["attention_mask"] is not None
                                           else torch.ones_like(call["input_ids"], dtype=torch.bool))
        for item, (sample, slots) in zip(items, self._placeholders(call["input_ids"], items)):
            p = positions[sample, slots]  # (n, 3): the item's (t, h, w)
            rows, cols = (int(p[:, a].max() - p[:, a].min()) + 1 for a in (1, 2))
            frames, rest = divmod(len(slots), rows * cols)
            item.layout = Layout(frames, rows, cols) if not rest else None
        return items

    def received_attention(self, layer_call: tuple[tuple, dict], call: tuple[tuple, dict]) -> list[Tensor]:
        """Per image or video (t x h x w / merge^2,): the attention each merge unit's patches received in the
        encoder's last block, averaged over heads, queries and the unit's merge^2 patches. The
        block's queries and keys are recomputed from its input (``norm1``, the q and k rows of
        ``qkv``, the rotary embedding it got) and the softmax is taken over each attention chunk
        it ran (``cu_seqlens``: a frame, or Qwen2.5-VL's window) in chunks of queries
        (:meth:`~tokred.signals.Heads.received`); Qwen2.5-VL's window order is undone as its
        encoder does."""
        from transformers.vision_utils import get_vision_window_index

        (layer_args, layer_kwargs), (args, kwargs) = layer_call, call
        hidden = layer_args[0] if layer_args else layer_kwargs["hidden_states"]
        bounds = layer_kwargs["cu_seqlens"].tolist()
        cos, sin = layer_kwargs["position_embeddings"]
        grid = args[1] if len(args) > 1 else kwargs.get("image_grid_thw", kwargs.get("video_grid_thw"))
        block = self.attention_layer
        attn = block.attn
        x = block.norm1(hidden)
        width = attn.qkv.in_features
        qk = torch.nn.functional.linear(x, attn.qkv.weight[:2 * width], attn.qkv.bias[:2 * width])
        q, k = qk.view(x.shape[0], 2, attn.num_heads, -1).unbind(1)
        q, k = self._rotate(q, k, cos, sin)
        received = []
        for start, end in zip(bounds, bounds[1:]):
            heads = Heads(q[start:end].transpose(0, 1)[None], k[start:end].transpose(0, 1)[None], attn.scaling, None)
            received.append(heads.received()[0])
            self.encoding.attention_flops += heads.flops()
        self.encoding.attention_flops += 2 * x.shape[0] * width * 2 * width
        units = torch.cat(received).view(-1, self.merge ** 2).mean(dim=-1)
        if hasattr(self.visual, "fullatt_block_indexes"):  # Qwen2.5-VL: back from window order
            window_index, _ = get_vision_window_index(grid, spatial_merge_size=self.merge,
                                                      window_size=self.visual.window_size,
                                                      patch_size=self.visual.patch_size, kwargs={})
            units = units[torch.argsort(window_index)]
        return list(units.split((grid.prod(dim=-1) // self.merge ** 2).tolist()))

    def _decode_positions(self, position_ids: Tensor | None) -> Tensor | None:
        """generate's decode positions (4, B, Q): each row the prompt's last position + 1 onwards, which
        after a video is not its maximum + 1 (transformers places the text after a video at its
        spatial, not its time, extent). Removed tokens do not change them, so they are used as given."""
        if position_ids is None:
            return None
        if position_ids.dim() != 3 or position_ids.shape[0] not in (3, 4):
            raise ValueError(f"Qwen2-VL position_ids must be (3, B, L) or (4, B, L), got {tuple(position_ids.shape)}")
        return position_ids[-3:].permute(1, 2, 0)

    def _after_prefill(self, next_position: Tensor, kept_length: Tensor) -> None:
        self.model.model.rope_deltas = (next_position - kept_length)[:, None]

    # FLOPs ------------------------------------------------------------------------------------------
    def add_vision_flops(self, report: FlopsReport) -> None:
        """The vision encoder (patch embedding, every block with attention over the chunks it really
        ran — whole images, or 2.5-VL's windows —, MLP) and the patch merger of each encoder run behind
        the last prefill's features, and the recomputed tower attention."""
        runs = [run for encoding in self.encodings for run in encoding.runs]
        for patches, chunks_per_block in runs:
            embed = self.visual.patch_embed.proj
            report.add("vision", "patch_embed", 2 * patches * embed.weight[0].numel() * embed.out_channels)
            for i, (block, chunks) in enumerate(zip(self.visual.blocks, chunks_per_block)):
                attn = block.attn
                head_dim = attn.qkv.out_features // 3 // attn.num_heads
                core = sum(attention_flops(1, attn.num_heads, n, n, head_dim) for n in chunks)
                report.add("vision", f"block{i}", linear_flops(attn, patches) + core + linear_flops(block.mlp, patches))
            report.add("projector", "merger", linear_flops(self.visual.merger, patches // self.merge ** 2))
        attention = sum(encoding.attention_flops for encoding in self.encodings)
        if attention:
            report.add("projector", "tower_attention", attention)
