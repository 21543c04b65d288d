"""Prefill and decode speed of vision-language models on CPU, with tokred's projector- and llm-stage
reducers, against the unreduced model and against an "oracle" in the same process.

Run ``python evals/bench_vlm.py [--family llava|qwen2_vl|onevision_video|all] [--rounds 3] [--threads 2]
[--batch 1] [--json out.json]`` (LLaVA: about 10-40 minutes on 2 threads; Qwen2-VL at 448 px: about 35
minutes on 1 thread; OneVision video at 8 and 16 frames: about 31 minutes on 2 threads; ``--tiny`` runs
toy models of every family in seconds). Each family gets its own table;
ratios compare rows of one table only. The models are built in code with seeded random weights
(speed does not depend on them), float32, SDPA:

- ``llava``: a CLIP ViT-L/14-336-shaped tower (24 layers, dim 1024, 576 patches + class token,
  feature layer -2), LLaVA's two-layer GELU projector and a Qwen2-0.5B-shaped language model (24
  layers, dim 896, 14 heads / 2 KV heads, SwiGLU 4864) with LLaVA-1.5's 32064-token vocabulary and
  an untied head (0.42B parameters). The prompt has LLaVA-1.5's chat layout: 35 system/user tokens,
  the 576 image placeholders, 25 question tokens. ``--ks`` sets the kept counts (64 128 192).
- ``qwen2_vl``: Qwen2-VL-2B's shapes: a 32-block vision encoder (dim 1280, 16 heads, MLP ratio 4,
  14 px patches, temporal patch 2) with its 2 x 2 patch merger (the projector), and a 28-layer
  language model (dim 1536, 12 heads / 2 KV heads, SwiGLU 8960, M-RoPE sections 16/24/24, the full
  151936-token vocabulary, tied embeddings). One square image per prompt (``--qwen-sides``, 448 px
  = 32 x 32 patches = 256 visual tokens; 896 px = 1024 tokens), between ``<vision_start>`` and
  ``<vision_end>``, after 20 and before 25 text tokens. ``--keeps`` sets the kept fractions (0.25).
  The oracle runs the unpatched encoder + merger, then the unpatched language model on the kept
  tokens' embeddings with their original 3-D positions (``get_rope_index`` on the full prompt), then
  the head; decode steps pass explicit 3-D positions.
- ``onevision_video``: LLaVA-OneVision-0.5B's shapes on one video per prompt: the SigLIP-so400m tower
  without its last layer (26 layers, dim 1152, 384 px, 27 x 27 patches, feature layer -1 "full"), the
  GELU projector, 2 x 2 bilinear pooling (196 tokens per frame) and one newline token after the video,
  and Qwen2-0.5B (24 layers, dim 896, 14 heads / 2 KV heads, SwiGLU 4864, 151936-token vocabulary, tied
  embeddings). ``--frames`` sets the clip lengths (8 16: 1569 and 3137 visual tokens), between 14 and 20
  text tokens. Rows: HoliTom at retain 0.10 (tau 0.65) and 0.25 (tau 0.80), each with its inner stage
  (keep 0.5 before layer 18), and the oracles at the counts HoliTom reaches before and after layer 18.
  The tower is identical in every row, so each timed round runs the encoder once for the unpatched rows
  and once with HoliTom's tower attention, and every row's prefill starts from those outputs (passed as
  ``mm_encoder_outputs``, as ``generate`` does): TTFT = encoder + prefill of the same round. No memory
  pass. Below the table: HoliTom's selection time over the unreduced TTFT, and the reference's FLOPs
  formula (FastV's 4nd^2 + 2n^2d + 2ndm on the visual tokens) for each row and for its headline setting
  (LLaVA-OneVision-7B, 32 frames: 6.9% in the paper).

Every configuration runs once per round in a rotating order (plus an uncounted
warm-up round); times are medians over rounds, and every ratio is the median of its per-round
ratios (each against a row of the same round). Columns: *kept* = visual tokens that reach the
language model (for llm-stage reducers: the layers from K on); *TTFT s* = time to first token, one
``model(..., use_cache=True, logits_to_keep=1)`` prefill; *TTFT ratio* = TTFT / unreduced TTFT, with
the quartiles of the per-round ratios; *prefill GFLOPs* = tokred's analytic count (tower +
projector + language model prefill, reducer included); *FLOPs ratio* = the same over the
unreduced count; *speedup ÷ predicted* = measured speedup / FLOPs-predicted speedup (= FLOPs ratio
/ TTFT ratio); *vs oracle bound* = TTFT / the fastest this reducer could be: the oracle's TTFT (the
unpatched tower + projector, then the unpatched language model + head on a sequence of text + kept
tokens) at the same kept count, plus for llm-stage reducers K/L of the measured language-model time
difference between the oracles on the tokens before K (all of them for DART and FastV; HoliTom's
outer stage's) and on the kept ones; *selection %* = the reducer's own selection (``plan_images`` /
``plan_sequence``, the language model's attention row for FastV and HoliTom's inner stage, the
tower attention for HoliTom) timed inside the run, as a share of the row's TTFT; *decode tok/s
ratio* = decode tokens/s over the unreduced model's (greedy, ``--decode-steps`` steps after the
prefill); *peak MB* = peak process RSS during the prefill minus the RSS just before it (sampled
every 2 ms in a separate pass after the timing rounds, with glibc's malloc set to return freed
memory); *KV MB* = bytes of the key and value
cache after the prefill. Oracle rows have no decode or selection (—).
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

import tokred
from tokred.cli import sweep, tables
from tokred.adapters.hf_llava import LlavaAdapter
from tokred.decoder import LanguageModelEngine

# model families --------------------------------------------------------------------------------------

LLAVA_FULL = dict(
    tower=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               image_size=336, patch_size=14),
    text=dict(vocab_size=32064, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096),
    image_token=32000, pad_token=32001, before=35, after=25, ks=(64, 128, 192), rounds=3, decode_steps=8,
)
LLAVA_TINY = dict(
    tower=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               image_size=56, patch_size=14),
    text=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    image_token=998, pad_token=999, before=35, after=25, ks=(4, 8), rounds=1, decode_steps=2,
)
# Qwen2-VL-2B's shapes (config.json of Qwen/Qwen2-VL-2B-Instruct): 675M vision encoder + merger, 1.54B
# language model with tied embeddings; token ids as in its tokenizer
QWEN_FULL = dict(
    vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2),
    text=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
              num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
              bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=True,
              rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
    ids=dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653),
    text_below=151643, before=20, after=25, sides=(448,), keeps=(0.25,), rounds=3, decode_steps=4,
)
QWEN_TINY = dict(
    vision=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2),
    text=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              tie_word_embeddings=True,
              rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}),
    ids=dict(image_token_id=90, video_token_id=91, vision_start_token_id=92, vision_end_token_id=93),
    text_below=90, before=20, after=25, sides=(112,), keeps=(0.25, 0.5), rounds=1, decode_steps=2,
)
LLM_LAYER = 2  # K for DART and FastV
# LLaVA-OneVision-0.5B's shapes (config.json of llava-hf/llava-onevision-qwen2-0.5b-ov-hf): the SigLIP-so400m
# tower without its last layer and head (26 layers, 384 px, 27 x 27 patches), feature layer -1 "full", a
# GELU projector, Qwen2-0.5B (tied embeddings); each frame's 27 x 27 tokens pooled to 14 x 14 (196), one
# newline after the video. HoliTom at the reference's settings: tau 0.65 with retain 0.10, 0.80 otherwise;
# inner stage keep 0.5 at K = 18.
ONEVISION_FULL = dict(
    tower=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
               image_size=384, patch_size=14, vision_use_head=False),
    text=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
              rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    image_token=151646, video_token=151647, pad_token=151643, before=14, after=20, frames=(8, 16),
    retains=(0.10, 0.25), layer=18, rounds=3, decode_steps=4,
)
ONEVISION_TINY = dict(
    tower=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               image_size=112, patch_size=14, vision_use_head=False),
    text=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    image_token=997, video_token=998, pad_token=999, before=14, after=20, frames=(4,),
    retains=(0.10, 0.25), layer=2, rounds=1, decode_steps=2,
)
README_MARKERS = ("<!-- bench-vlm-video:start -->", "<!-- bench-vlm-video:end -->")
#: the reference's headline shape, LLaVA-OneVision-7B (Qwen2-7B: 28 layers, d 3584, MLP 18944) on 32 frames
HEADLINE = dict(layers=28, d=3584, m=18944, frames=32, per_frame=196, retain=0.10, inner_keep=0.5, layer=18)


def _sdpa(*configs) -> None:
    for c in configs:
        c._attn_implementation = "sdpa"


def _count(*modules) -> int:
    """Parameters of ``modules``, each tensor once (tied embeddings count once)."""
    seen = {}
    for module in modules:
        for p in module.parameters():
            seen[p.data_ptr()] = p.numel()
    return sum(seen.values())


class Llava:
    """LLaVA-1.5: CLIP tower, two-layer projector, Qwen2-shaped language model, 1-D positions."""

    name, title = "llava", "LLaVA-1.5-shaped"
    parts = ("tower", "projector", "language model")
    modality = "image"
    protected = 0  # visual tokens no reducer removes (OneVision's video newline)
    shares_encoder = False  # True: each timed round encodes once and every row's prefill starts from it

    def __init__(self, shape: dict):
        self.shape = shape
        self.image_token = shape["image_token"]

    def build(self, seed: int = 0):
        """LlavaForConditionalGeneration with seeded random weights, eval mode, float32, SDPA."""
        from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

        shape = self.shape
        text = Qwen2Config(**shape["text"], pad_token_id=shape["pad_token"], tie_word_embeddings=False)
        config = LlavaConfig(vision_config=CLIPVisionConfig(**shape["tower"]), text_config=text,
                             image_token_id=shape["image_token"], vision_feature_layer=-2,
                             vision_feature_select_strategy="default", projector_hidden_act="gelu",
                             tie_word_embeddings=False)
        _sdpa(config, config.text_config, config.vision_config)
        torch.manual_seed(seed)
        return LlavaForConditionalGeneration(config).eval().float()

    def sides(self, model) -> list[int]:
        return [model.config.vision_config.image_size]

    def inputs(self, model, side: int, batch: int, seed: int = 0) -> dict:
        """LLaVA-1.5 chat layout: ``before`` text ids, the image placeholders, ``after`` text ids;
        random ids below the image token (never the image token), one random image per sample."""
        shape = self.shape
        generator = torch.Generator().manual_seed(seed)
        high = min(shape["image_token"], model.config.text_config.vocab_size)
        rows, cols = self.grid(model, None)
        prompts = []
        for _ in range(batch):
            before = torch.randint(3, high, (shape["before"],), generator=generator)
            after = torch.randint(3, high, (shape["after"],), generator=generator)
            prompts.append(torch.cat([before, torch.full((rows * cols,), shape["image_token"]), after]))
        input_ids = torch.stack(prompts)
        return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                    pixel_values=torch.randn(batch, 3, side, side, generator=generator))

    def grid(self, model, inputs) -> tuple[int, int]:
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    def decode_kwargs(self, step: int) -> dict:
        return {}

    def specs(self, n: int, ks: tuple[int, ...], grid: tuple[int, int]) -> list[Spec]:
        """The rows for ``n`` visual tokens on a ``grid``: :func:`make_specs` at the kept counts ``ks``."""
        return make_specs(ks, grid)

    def visual_features(self, model, inputs: dict) -> Tensor:
        """(B, n, D) visual tokens of the unpatched tower + projector."""
        config = model.config
        features = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], return_dict=True, vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy).pooler_output
        return features if torch.is_tensor(features) else torch.stack(list(features))

    def oracle_language_model(self, model, embeds: Tensor, inputs: dict, index: Tensor):
        return model.model.language_model(inputs_embeds=embeds, use_cache=True)

    def parameters(self, model) -> dict:
        return dict(tower=_count(model.model.vision_tower), projector=_count(model.model.multi_modal_projector),
                    language_model=_count(model.model.language_model, model.lm_head))


class Qwen2VL(Llava):
    """Qwen2-VL: a packed-sequence ViT with 2 x 2 patch merger (the projector), a Qwen2 language
    model with 3-D M-RoPE positions; one image per sample, ``<vision_start>`` image ``<vision_end>``."""

    name, title = "qwen2_vl", "Qwen2-VL-2B-shaped"
    parts = ("vision encoder", "merger", "language model")

    def __init__(self, shape: dict):
        self.shape = shape
        self.image_token = shape["ids"]["image_token_id"]
        self.next_position: Tensor | None = None

    def build(self, seed: int = 0):
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        shape = self.shape
        config = Qwen2VLConfig(text_config=shape["text"], vision_config=shape["vision"], **shape["ids"],
                               tie_word_embeddings=shape["text"]["tie_word_embeddings"])
        _sdpa(config, config.text_config, config.vision_config)
        torch.manual_seed(seed)
        return Qwen2VLForConditionalGeneration(config).eval().float()

    def sides(self, model) -> list[int]:
        return list(self.shape["sides"])

    def inputs(self, model, side: int, batch: int, seed: int = 0) -> dict:
        """Qwen2-VL chat layout: ``before`` text ids, ``<vision_start>``, the image placeholders
        (side/14 x side/14 patches, merged 2 x 2), ``<vision_end>``, ``after`` text ids; random text
        ids below the special tokens, random pixel rows, ``mm_token_type_ids`` as the processor gives."""
        shape, ids = self.shape, self.shape["ids"]
        vision = model.config.vision_config
        patches = side // vision.patch_size
        n = patches * patches // vision.spatial_merge_size ** 2
        generator = torch.Generator().manual_seed(seed)
        high = min(shape["text_below"], model.config.text_config.vocab_size)
        rows = []
        for _ in range(batch):
            before = torch.randint(3, high, (shape["before"],), generator=generator)
            after = torch.randint(3, high, (shape["after"],), generator=generator)
            rows.append(torch.cat([before, torch.tensor([ids["vision_start_token_id"]]),
                                   torch.full((n,), self.image_token), torch.tensor([ids["vision_end_token_id"]]),
                                   after]))
        input_ids = torch.stack(rows)
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                      pixel_values=torch.randn(batch * patches * patches, width, generator=generator),
                      image_grid_thw=torch.tensor([[1, patches, patches]] * batch),
                      mm_token_type_ids=(input_ids == self.image_token).int())
        positions, _ = model.model.get_rope_index(input_ids, inputs["mm_token_type_ids"],
                                                  image_grid_thw=inputs["image_grid_thw"],
                                                  attention_mask=inputs["attention_mask"])
        self.next_position = positions.amax(dim=(0, 2)) + 1  # (B,): the first decode position on all 3 axes
        return inputs

    def grid(self, model, inputs) -> tuple[int, int]:
        _, h, w = inputs["image_grid_thw"][0].tolist()
        merge = model.config.vision_config.spatial_merge_size
        return h // merge, w // merge

    def decode_kwargs(self, step: int) -> dict:
        """Explicit 3-D positions (previous + 1, as generate sends): the unpatched forward cannot derive
        them from a 2-D mask in 5.24; tokred's reduced decode uses its own."""
        return dict(position_ids=(self.next_position + step)[None, :, None].expand(3, -1, 1))

    def visual_features(self, model, inputs: dict) -> Tensor:
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                  return_dict=True).pooler_output
        return torch.stack(list(features))

    def oracle_language_model(self, model, embeds: Tensor, inputs: dict, index: Tensor):
        """The unpatched language model on the kept tokens with their original 3-D positions."""
        positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                  image_grid_thw=inputs["image_grid_thw"],
                                                  attention_mask=inputs["attention_mask"])
        return model.model.language_model(inputs_embeds=embeds, position_ids=positions[:, :, index], use_cache=True)

    def parameters(self, model) -> dict:
        visual = model.model.visual
        tower = _count(visual) - _count(visual.merger)
        return dict(tower=tower, projector=_count(visual.merger),
                    language_model=_count(model.model.language_model, model.lm_head))


class OneVisionVideo(Llava):
    """LLaVA-OneVision on one video per prompt: the tower on every frame, the projector, 2 x 2 bilinear
    pooling, one ``image_newline`` after the video; 1-D positions. Sizes are frame counts."""

    name, title = "onevision_video", "LLaVA-OneVision-0.5B-shaped, video"
    modality = "video"
    protected = 1
    shares_encoder = True

    def __init__(self, shape: dict):
        self.shape = shape
        self.image_token = shape["video_token"]  # the placeholder the visual tokens fill

    def build(self, seed: int = 0):
        """LlavaOnevisionForConditionalGeneration with seeded random weights, eval mode, float32, SDPA."""
        from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                                  SiglipVisionConfig)

        shape = self.shape
        text = Qwen2Config(**shape["text"], pad_token_id=shape["pad_token"], tie_word_embeddings=True)
        config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**shape["tower"]), text_config=text,
                                      image_token_id=shape["image_token"], video_token_id=shape["video_token"],
                                      vision_feature_layer=-1, vision_feature_select_strategy="full",
                                      projector_hidden_act="gelu", tie_word_embeddings=True)
        _sdpa(config, config.text_config, config.vision_config)
        torch.manual_seed(seed)
        return LlavaOnevisionForConditionalGeneration(config).eval().float()

    def sides(self, model) -> list[int]:
        return list(self.shape["frames"])

    def grid(self, model, inputs) -> tuple[int, int]:
        """A frame's pooled token grid."""
        vision = model.config.vision_config
        side = math.ceil(vision.image_size // vision.patch_size / 2)
        return side, side

    def per_frame(self, model) -> int:
        return math.prod(self.grid(model, None))

    def inputs(self, model, frames: int, batch: int, seed: int = 0) -> dict:
        """``before`` text ids, the video's placeholders (frames x pooled tokens + the newline), ``after``
        text ids; random ids below the special tokens, one random clip per sample."""
        shape = self.shape
        generator = torch.Generator().manual_seed(seed)
        high = min(shape["image_token"], shape["pad_token"], model.config.text_config.vocab_size)
        n = frames * self.per_frame(model) + 1
        prompts = []
        for _ in range(batch):
            before = torch.randint(3, high, (shape["before"],), generator=generator)
            after = torch.randint(3, high, (shape["after"],), generator=generator)
            prompts.append(torch.cat([before, torch.full((n,), self.image_token), after]))
        input_ids = torch.stack(prompts)
        side = model.config.vision_config.image_size
        return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                    pixel_values_videos=torch.randn(batch, frames, 3, side, side, generator=generator))

    def encode(self, model, inputs: dict):
        """The model's ``get_video_features`` (tokred's, with the tower attention, while HoliTom is applied)."""
        config = model.config
        return model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"], return_dict=True,
                                              vision_feature_layer=config.vision_feature_layer,
                                              vision_feature_select_strategy=config.vision_feature_select_strategy)

    def visual_features(self, model, inputs: dict) -> Tensor:
        return self.encode(model, inputs).pooler_output

    def specs(self, n: int, ks: tuple[int, ...], grid: tuple[int, int]) -> list[Spec]:
        """The unreduced model, the full-length oracle and HoliTom (both stages) at each of the shape's
        retains (``ks`` unused)."""
        layer = self.shape["layer"]
        specs = [Spec("none", "none", "—", n), Spec(f"oracle-{n}", "oracle (unpatched, full length)", "oracle", n,
                                                    oracle=n)]
        for retain in self.shape["retains"]:
            tau = 0.65 if retain == 0.10 else 0.80
            reducers = (tokred.HoliTom(retain=retain, tau=tau), tokred.HoliTomInner(keep=0.5, layer=layer))
            specs.append(Spec(f"holitom-{retain:g}", f"HoliTom r={retain:g} τ={tau:g}, inner K={layer}",
                              "projector + llm", round(retain * (n - 1)), reducers))
        return specs


FAMILIES = {"llava": (Llava, LLAVA_FULL, LLAVA_TINY), "qwen2_vl": (Qwen2VL, QWEN_FULL, QWEN_TINY),
            "onevision_video": (OneVisionVideo, ONEVISION_FULL, ONEVISION_TINY)}


# configurations ----------------------------------------------------------------------------------------

@dataclass
class Spec:
    """One row: no reduction, reducers, or the oracle on ``oracle`` visual tokens."""

    key: str
    label: str
    stage: str
    target: int  # the kept count the row is grouped under
    reducers: tuple[tokred.reducers.base.Reducer, ...] = ()
    oracle: int | None = None

    @property
    def layer(self) -> int | None:
        """K of the row's llm-stage reducer, if it has one."""
        return next((r.layer for r in self.reducers if r.stage == "llm"), None)


def pool_stride(grid: tuple[int, int], k: int) -> tuple[int, int]:
    """The (rows, cols) pooling window, dividing the grid (no partial windows) and at most 4 a side, whose
    output count is closest to k; ties go to square windows."""
    rows, cols = grid
    options = [(a, b) for a in range(1, 5) for b in range(1, 5) if rows % a == 0 and cols % b == 0]
    return min(options, key=lambda s: (abs(pool_count(grid, s) - k), abs(s[0] - s[1]), s))


def pool_count(grid: tuple[int, int], stride: tuple[int, int]) -> int:
    return math.ceil(grid[0] / stride[0]) * math.ceil(grid[1] / stride[1])


def make_specs(ks: tuple[int, ...], grid: tuple[int, int]) -> list[Spec]:
    n = grid[0] * grid[1]
    specs = [Spec("none", "none", "—", n),
             Spec(f"oracle-{n}", "oracle (unpatched, full length)", "oracle", n, oracle=n)]
    oracles = {n}
    pools = set()
    for k in ks:
        group = []
        stride = pool_stride(grid, k)
        count = pool_count(grid, stride)
        for c in sorted({k, count}):
            if c not in oracles:
                oracles.add(c)
                group.append(Spec(f"oracle-{c}", "oracle", "oracle", k, oracle=c))
        group.append(Spec(f"divprune-{k}", "DivPrune", "projector", k, (tokred.DivPrune(keep=k),)))
        group.append(Spec(f"random-{k}", "Random", "projector", k,
                          (tokred.Random(keep=k / n, stage="projector"),)))
        if stride not in pools:
            pools.add(stride)
            group.append(Spec(f"pool-{stride[0]}x{stride[1]}", f"Pool {stride[0]}x{stride[1]}", "projector", k,
                              (tokred.Pool(stride=stride[0] if stride[0] == stride[1] else stride, stage="projector"),)))
        group.append(Spec(f"dart-{k}", f"DART K={LLM_LAYER}", "llm", k, (tokred.DART(keep=k, layer=LLM_LAYER),)))
        group.append(Spec(f"fastv-{k}", f"FastV K={LLM_LAYER}", "llm", k, (tokred.FastV(keep=k, layer=LLM_LAYER),)))
        specs += group
    return specs


# selection timing --------------------------------------------------------------------------------------

class Stopwatch:
    """Seconds spent in the reducer's own selection during the current run."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


SELECTION = Stopwatch()
_TIMED_CLASSES: dict[type, type] = {}


def timed_reducer(reducer):
    """A copy of ``reducer`` whose selection method (``plan_images`` or ``plan_sequence``) adds to SELECTION."""
    base = type(reducer)
    if base not in _TIMED_CLASSES:
        method = "plan_sequence" if reducer.stage == "llm" else "plan_images"
        original = getattr(base, method)

        def selection(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                SELECTION.seconds += time.perf_counter() - start

        _TIMED_CLASSES[base] = type(base.__name__, (base,), {method: selection, "__module__": __name__})
    return _TIMED_CLASSES[base](**{f.name: getattr(reducer, f.name) for f in dataclasses.fields(reducer)})


def configure(model, spec: Spec) -> None:
    """Patch the model for ``spec`` (unpatched for the none and oracle rows)."""
    if not spec.reducers:
        tokred.remove(model)
        return
    tokred.apply(model, *(timed_reducer(reducer) for reducer in spec.reducers))


# Signals computed for a reducer alone are part of its selection time: the last prompt token's attention
# row in the language model (FastV, HoliTom's inner stage) and the tower attention (HoliTom's outer stage)
LanguageModelEngine.last_attention = SELECTION.wrap(LanguageModelEngine.last_attention)
LlavaAdapter.received_attention = SELECTION.wrap(LlavaAdapter.received_attention)


# one run -----------------------------------------------------------------------------------------------

def prefill(model, inputs: dict):
    start = time.perf_counter()
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start, out


def next_token(logits, image_token: int):
    logits = logits[:, -1].clone()
    logits[:, image_token] = -torch.inf  # a generated image placeholder would mean something else
    return logits.argmax(dim=-1, keepdim=True)


def decode(model, family, inputs: dict, out, steps: int) -> float:
    """Seconds for ``steps`` greedy decode steps after the prefill ``out``."""
    cache, mask = out.past_key_values, inputs["attention_mask"]
    token = next_token(out.logits, family.image_token)
    start = time.perf_counter()
    for i in range(steps):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        step = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1,
                     **family.decode_kwargs(i))
        token = next_token(step.logits, family.image_token)
    return time.perf_counter() - start


def oracle(model, family, inputs: dict, count: int, features: Tensor | None = None):
    """The unpatched model on a sequence of the reduced length: tower + projector on the full image
    (unless its ``features`` are given), then the language model + head on text + the first ``count``
    visual tokens (for Qwen2-VL with their original 3-D positions). Returns (seconds, language model
    seconds, cache). Batch rows share one layout."""
    base = model.model
    ids = inputs["input_ids"]
    image = (ids[0] == family.image_token).nonzero().squeeze(1)
    first, last = int(image[0]), int(image[-1])
    index = torch.cat([torch.arange(first + count), torch.arange(last + 1, ids.shape[1])])
    start = time.perf_counter()
    if features is None:
        features = family.visual_features(model, inputs)
    embed = base.get_input_embeddings()
    embeds = torch.cat([embed(ids[:, :first]), features[:, :count].to(embed.weight.dtype), embed(ids[:, last + 1:])],
                       dim=1)
    middle = time.perf_counter()
    out = family.oracle_language_model(model, embeds, inputs, index)
    model.lm_head(out.last_hidden_state[:, -1:])
    end = time.perf_counter()
    return end - start, end - middle, out.past_key_values


def kv_megabytes(cache) -> float:
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers) / 2 ** 20


# memory ------------------------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRss:
    """Peak RSS (sampled every ``interval`` s in a thread) minus the RSS on entry, in ``.megabytes``."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval

    def __enter__(self):
        self.before = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.megabytes = (self.peak - self.before) / 2 ** 20


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_freed_memory(libc, first: bool) -> None:
    """Make RSS follow live memory: large blocks from mmap (returned on free), free heap trimmed."""
    if libc is None:
        return
    if first:
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (also stops glibc raising it on its own)
    gc.collect()
    libc.malloc_trim(0)


# the benchmark -----------------------------------------------------------------------------------------

def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def iqr(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]] if values else [float("nan")] * 2
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    return [low, high]


@dataclass
class Measured:
    ttft: list[float] = field(default_factory=list)
    lm: list[float] = field(default_factory=list)  # oracle: language model + head alone
    selection: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    flops: dict | None = None
    kept: int | None = None
    early: int | None = None  # llm-stage rows: visual tokens in the layers before K
    kv_mb: float | None = None
    peak_mb: float | None = None

    def add(self, run: dict) -> None:
        for name in ("ttft", "lm", "selection", "decode"):
            if name in run:
                getattr(self, name).append(run[name])


def prefill_flops(model) -> dict:
    """FLOPs of the last forward by stage, ``prefill`` (their total) and ``decode_per_token``."""
    report = tokred.flops(model)
    return dict(report.stages, prefill=report.total, decode_per_token=report.decode_per_token)


def visual_tokens(family, inputs: dict) -> int:
    return int((inputs["input_ids"][0] == family.image_token).sum())


def run_once(model, family, inputs: dict, spec: Spec, decode_steps: int, details: bool,
             encoded: tuple[dict, float, float] | None = None) -> dict:
    """One run of ``spec``: times, and with ``details`` the kept count, FLOPs and KV size. With
    ``encoded`` (``mm_encoder_outputs``, the seconds they took, the selection seconds among them), the
    prefill starts from those encoder outputs, as ``generate`` does, and their time is added."""
    n = visual_tokens(family, inputs)
    configure(model, spec)
    SELECTION.seconds = 0.0
    outputs, encode_seconds, encode_selection = encoded if encoded is not None else (None, 0.0, 0.0)
    if spec.oracle is not None:
        features = None if outputs is None else outputs[family.modality].pooler_output
        seconds, lm_seconds, cache = oracle(model, family, inputs, spec.oracle, features)
        run = dict(ttft=encode_seconds + seconds, lm=lm_seconds)
        if details:
            run.update(kept=spec.oracle, kv_mb=kv_megabytes(cache))
        return run
    if outputs is not None:
        inputs = {k: v for k, v in inputs.items() if not k.startswith("pixel_values")} | dict(mm_encoder_outputs=outputs)
    seconds, out = prefill(model, inputs)
    run = dict(ttft=encode_seconds + seconds, selection=encode_selection + SELECTION.seconds)
    if details:
        run["kv_mb"] = kv_megabytes(out.past_key_values)
        if spec.reducers:
            trace = tokred.last_trace(model)
            run["flops"] = prefill_flops(model)
            run["kept"] = trace.final_tokens - (inputs["input_ids"].shape[1] - n)
            run["early"] = trace.tokens("projector")[0] if trace.tokens("projector") else n
    if decode_steps:
        run["decode"] = decode(model, family, inputs, out, decode_steps)
    return run


def oracle_flops(model, inputs: dict, n: int, count: int, protected: int = 0) -> dict:
    """The oracle computes what a projector-stage Random keeping ``count`` of ``n`` tokens computes
    (Random has no FLOPs of its own; ``protected`` of the tokens are never removed): tokred's count of
    that run."""
    if count == n:
        tokred.remove(model)
        report = tokred.flops(model, **inputs, use_cache=True, logits_to_keep=1)
        return dict(report.stages, prefill=report.total, decode_per_token=report.decode_per_token)
    tokred.apply(model, tokred.Random(keep=count - protected, stage="projector"))
    model(**inputs, use_cache=True, logits_to_keep=1)
    flops = prefill_flops(model)
    tokred.remove(model)
    return flops


def shared_encodings(model, family, inputs: dict, specs: list[Spec],
                     round_index: int) -> dict[bool, tuple[dict, float, float]]:
    """For the unpatched rows (False) and the reduced rows (True, all needing the same encoder signals):
    one timed run of the family's encoder, as ``(mm_encoder_outputs, seconds, selection seconds within)``."""
    encodings = {}
    for reduced in (False, True) if round_index % 2 else (True, False):  # alternate which runs first
        spec = next((s for s in specs if bool(s.reducers) == reduced), None)
        if spec is None:
            continue
        configure(model, spec)
        SELECTION.seconds = 0.0
        start = time.perf_counter()
        outputs = family.encode(model, inputs)
        encodings[reduced] = ({family.modality: outputs}, time.perf_counter() - start, SELECTION.seconds)
    return encodings


def benchmark(args, family, model, size: int, ks: tuple[int, ...], rounds: int, decode_steps: int) -> dict:
    """Every configuration on one input size (an image side, or a video's frames), interleaved over
    ``rounds`` timed rounds. Round 0 (uncounted) gives the kept counts, FLOPs and KV sizes; oracle rows
    for counts it reveals (HoliTom's) join after it."""
    started = time.perf_counter()
    inputs = family.inputs(model, size, args.batch, args.seed)
    n = visual_tokens(family, inputs)
    specs = family.specs(n, ks, family.grid(model, inputs))
    if args.only:  # the unreduced and full-length oracle rows are the references: always kept
        specs = [spec for spec in specs if spec.key in args.only or spec.key in ("none", f"oracle-{n}")]
    measured = {spec.key: Measured() for spec in specs}
    libc = _libc()
    memory = not (args.no_memory or family.shares_encoder)
    passes = rounds + 2 + memory
    progress = tqdm(total=len(specs) * passes, desc=f"bench_vlm {family.name} {n}", disable=args.no_progress)

    flops_by_count = {}

    def add_oracle_flops(new: list[Spec]) -> None:  # FLOPs of the unreduced model and of the oracles: untimed
        for spec in new:
            progress.set_postfix_str(f"FLOPs {spec.key}")
            if not spec.reducers:
                count = spec.oracle or n
                if count not in flops_by_count:
                    flops_by_count[count] = oracle_flops(model, inputs, n, count, family.protected)
                measured[spec.key].flops, measured[spec.key].kept = flops_by_count[count], count
            progress.update()

    def run_round(round_index: int, names: list[str]) -> None:
        # rows that start from shared encoder outputs: every row of a timed round; in round 0 the unpatched
        # ones only (the reduced rows run whole then, for their trace and FLOPs)
        shared = [by_key[key] for key in names if family.shares_encoder and (round_index or not by_key[key].reducers)]
        encodings = shared_encodings(model, family, inputs, shared, round_index)
        shift = round_index % len(names)
        for key in names[shift:] + names[:shift]:
            spec = by_key[key]
            progress.set_postfix_str(f"round {round_index}/{rounds} {key}")
            run = run_once(model, family, inputs, spec, decode_steps, details=round_index == 0,
                           encoded=encodings.get(bool(spec.reducers)) if spec in shared else None)
            m = measured[key]
            if round_index == 0:
                m.kv_mb = run["kv_mb"]
                m.kept = run.get("kept", m.kept)
                m.early = run.get("early") if spec.layer is not None else None
                m.flops = run.get("flops", m.flops)
            else:
                m.add(run)
            progress.update()

    with torch.inference_mode():
        add_oracle_flops(specs)
        by_key = {spec.key: spec for spec in specs}
        run_round(0, list(by_key))  # the warm-up
        counts = sorted({c for spec in specs if spec.reducers for c in (measured[spec.key].kept,
                                                                       measured[spec.key].early) if c})
        late = [Spec(f"oracle-{c}", "oracle", "oracle", c, oracle=c) for c in counts if f"oracle-{c}" not in by_key]
        if late:
            specs += late
            measured.update({spec.key: Measured() for spec in late})
            by_key.update({spec.key: spec for spec in late})
            progress.total += len(late) * passes
            add_oracle_flops(late)
            run_round(0, [spec.key for spec in late])
        for round_index in range(1, rounds + 1):
            run_round(round_index, list(by_key))
        for i, spec in enumerate(specs if memory else []):  # memory pass, after the timing rounds
            progress.set_postfix_str(f"memory {spec.key}")
            configure(model, spec)
            release_freed_memory(libc, i == 0)
            with PeakRss() as peak:
                if spec.oracle is not None:
                    result = oracle(model, family, inputs, spec.oracle)
                else:
                    result = prefill(model, inputs)
            del result
            measured[spec.key].peak_mb = peak.megabytes if libc is not None else None
            progress.update()
        tokred.remove(model)
    progress.close()
    text = model.config.text_config
    rows = summarise(specs, measured, text.num_hidden_layers, decode_steps, args.batch)
    for row, spec in zip(rows, specs):
        if spec.layer is not None and spec.stage != "llm":  # HoliTom: the reference's own FLOPs formula
            row["reference_formula_ratio"] = reference_flops_ratio(
                text.num_hidden_layers, spec.layer, text.hidden_size, text.intermediate_size, n, row["early"],
                row["kept"])
    import transformers
    length = int(inputs["input_ids"].shape[1])
    shape = family.shape
    title = family.title + (" (tiny)" if args.tiny else "")
    return dict(family=family.name, title=title, parts=list(family.parts), rows=rows, tiny=args.tiny, rounds=rounds,
                decode_steps=decode_steps, batch=args.batch, threads=torch.get_num_threads(),
                ks=list(ks), llm_layer=shape.get("layer", LLM_LAYER), modality=family.modality, grid=list(family.grid(model, inputs)),
                **{"image_side" if family.modality == "image" else "frames": size},
                prompt=dict(before=shape["before"], image=n, after=shape["after"],
                            markers=length - shape["before"] - n - shape["after"], total=length),
                parameters=family.parameters(model),
                shapes={k: v for k, v in shape.items() if isinstance(v, dict)}, seconds=time.perf_counter() - started,
                torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                cpu_count=os.cpu_count(), **({"headline": headline_ratio()} if family.modality == "video" else {}))


def reference_flops_ratio(layers: int, layer: int, d: int, m: int, n: int, early: int, kept: int) -> float:
    """HoliTom's headline FLOPs ratio: FastV's per-layer count 4nd^2 + 2n^2d + 2ndm on the visual
    tokens alone (no tower, no text), layers before ``layer`` on ``early`` tokens and the others on
    ``kept``, over every layer on ``n``."""
    def per_layer(x: int) -> int:
        return 4 * x * d * d + 2 * x * x * d + 2 * x * d * m
    return (layer * per_layer(early) + (layers - layer) * per_layer(kept)) / (layers * per_layer(n))


def headline_ratio() -> dict:
    """The reference's formula on its headline setting (LLaVA-OneVision-7B, 32 frames, retain 0.10,
    inner keep 0.5 at K = 18), with the token counts tokred's budget rules give (newline left out)."""
    h = HEADLINE
    n = h["frames"] * h["per_frame"]
    early = round(h["retain"] * n)
    kept = round(h["inner_keep"] * early)  # half to even, as HoliTomInner
    return dict(HEADLINE, tokens=n, early=early, kept=kept,
                ratio=reference_flops_ratio(h["layers"], h["layer"], h["d"], h["m"], n, early, kept))


def summarise(specs: list[Spec], measured: dict[str, Measured], num_layers: int, decode_steps: int,
              batch: int) -> list[dict]:
    none = measured["none"]
    full_flops = none.flops["prefill"]
    n = none.kept
    rows = []
    for spec in specs:
        m = measured[spec.key]
        ttft = median(m.ttft)
        ratios = [t / f for t, f in zip(m.ttft, none.ttft)]  # paired: the same round
        row = dict(key=spec.key, reducer=spec.label, stage=spec.stage, target=spec.target, kept=m.kept,
                   config=" + ".join(map(repr, spec.reducers)) or None, early=m.early,
                   ttft_s=ttft, ttft_s_rounds=m.ttft, ttft_ratio=median(ratios), ttft_ratio_iqr=iqr(ratios),
                   flops=m.flops, prefill_gflops=m.flops["prefill"] / 1e9,
                   flops_ratio=m.flops["prefill"] / full_flops)
        row["predicted_speedup"] = full_flops / m.flops["prefill"]
        row["measured_speedup"] = 1 / row["ttft_ratio"]
        row["of_predicted"] = row["measured_speedup"] / row["predicted_speedup"]
        reference = measured.get(f"oracle-{m.kept}")
        if reference is not None and reference.ttft:
            bounds = list(reference.ttft)
            if spec.layer is not None:  # layers 0..K-1 run on the tokens before the llm stage
                early = measured[f"oracle-{m.early or n}"]
                bounds = [b + spec.layer / num_layers * (e - r) for b, e, r in zip(bounds, early.lm, reference.lm)]
            row["oracle_bound_s"] = median(bounds)
            row["vs_oracle_bound"] = median([t / b for t, b in zip(m.ttft, bounds)])
        if spec.oracle is not None:
            row["lm_s"] = median(m.lm)
            row["lm_s_rounds"] = m.lm
        else:
            row["selection_s"] = median(m.selection)
            row["selection_s_rounds"] = m.selection
            row["selection_share"] = row["selection_s"] / ttft
            if decode_steps:
                row["decode_s_rounds"] = m.decode
                row["decode_tokens_per_s"] = decode_steps * batch / median(m.decode)
                row["decode_ratio"] = median([f / d for d, f in zip(m.decode, none.decode)])
        row["kv_mb"], row["peak_mb"] = m.kv_mb, m.peak_mb
        rows.append(row)
    return rows


# output ------------------------------------------------------------------------------------------------

def _fmt(value, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _num(value: float) -> str:
    """Two decimals, or three significant digits for small numbers (the tiny model)."""
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


COLUMNS = ["reducer", "stage", "kept", "TTFT s", "TTFT ratio (IQR)", "prefill GFLOPs", "FLOPs ratio",
           "speedup ÷ predicted", "vs oracle bound", "selection %", "decode tok/s ratio", "peak MB", "KV MB"]


def markdown(result: dict) -> str:
    rows = []
    for row in result["rows"]:
        low, high = row["ttft_ratio_iqr"]
        selection = row.get("selection_share")
        rows.append([row["reducer"], row["stage"], row["kept"], _num(row["ttft_s"]),
                     f"{row['ttft_ratio']:.3f} ({low:.2f}-{high:.2f})", _num(row["prefill_gflops"]),
                     f"{row['flops_ratio']:.3f}", f"{row['of_predicted']:.3f}",
                     _fmt(row.get("vs_oracle_bound"), ".3f"),
                     _fmt(None if selection is None else 100 * selection, ".2f", "%"),
                     _fmt(row.get("decode_ratio"), ".3f"), _fmt(row["peak_mb"], ".0f"), _fmt(row["kv_mb"], ".1f")])
    lines = [tables.markdown(rows, COLUMNS)]
    none, full_oracle = result["rows"][0], result["rows"][1]
    params, prompt = result["parameters"], result["prompt"]
    lines.append("")
    tower, projector, language = result.get("parts", ("tower", "projector", "language model"))
    markers = f" + {prompt['markers']} markers" if prompt.get("markers") else ""
    threads = f"{result['threads']} thread" + ("s" if result["threads"] != 1 else "")
    lines.append(f"{result.get('title', 'LLaVA-1.5-shaped')}, {prompt['total']} prompt tokens ({prompt['before']} + "
                 f"{prompt['image']} {result.get('modality', 'image')}{markers} + {prompt['after']}), "
                 f"batch {result['batch']}, {threads} (torch.set_num_threads), {result['rounds']} rounds + warm-up; "
                 f"parameters: {tower} {params['tower'] / 1e6:.3g}M, {projector} {params['projector'] / 1e6:.3g}M, "
                 f"{language} {params['language_model'] / 1e6:.3g}M. Full-length oracle: {tower} + {projector} "
                 f"{_num(full_oracle['ttft_s'] - full_oracle['lm_s'])} s, {language} + head "
                 f"{_num(full_oracle['lm_s'])} s. Unreduced decode {_fmt(none.get('decode_tokens_per_s'), '.2f')} "
                 f"tok/s. Run took {result['seconds'] / 60:.1f} min.")
    if result.get("modality") == "video":
        lines.append("")
        lines.append("- Each timed round runs the encoder (tower, projector, pooling) once for the unpatched rows and "
                     "once with HoliTom's tower attention; every row's prefill starts from those outputs, as "
                     "`generate` does, and its TTFT is encoder + prefill.")
    for row in result["rows"]:
        if "reference_formula_ratio" in row:
            lines.append(f"- {row['reducer']}: {row['early']} visual tokens before K, {row['kept']} from K on; "
                         f"selection (tower attention, outer plan, attention row, inner merge) {_num(row['selection_s'])} "
                         f"s = {row['selection_s'] / none['ttft_s']:.2%} of the unreduced TTFT; the reference's FLOPs "
                         f"formula {row['reference_formula_ratio']:.1%} (tokred's prefill FLOPs ratio, tower and text "
                         f"included: {row['flops_ratio']:.1%}).")
    if "headline" in result:
        h = result["headline"]
        lines.append(f"- The reference's headline setting (LLaVA-OneVision-7B: {h['layers']} layers, d {h['d']}, MLP "
                     f"{h['m']}; {h['frames']} frames, r {h['retain']:g}, inner keep {h['inner_keep']:g} at K "
                     f"{h['layer']}): {h['tokens']} → {h['early']} → {h['kept']} visual tokens, FLOPs formula "
                     f"{h['ratio']:.1%} (paper: 6.9%).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=(*FAMILIES, "all"), default="all",
                        help="model family: the LLaVA-1.5-shaped model, the Qwen2-VL-2B-shaped one, the "
                             "LLaVA-OneVision-0.5B-shaped one on video, or all three")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds after the warm-up (default 3; tiny 1)")
    parser.add_argument("--decode-steps", type=int, default=None,
                        help="decode steps timed after each prefill (LLaVA 8, Qwen2-VL and OneVision video 4)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ks", type=int, nargs="+", help="LLaVA: kept visual token counts (default 64 128 192)")
    parser.add_argument("--keeps", type=float, nargs="+",
                        help="Qwen2-VL: kept fractions of each image's visual tokens (default 0.25)")
    parser.add_argument("--qwen-sides", type=int, nargs="+",
                        help="Qwen2-VL: square image sides in pixels, one run each (default 448 = 256 visual tokens; "
                             "896 = 1024)")
    parser.add_argument("--frames", type=int, nargs="+",
                        help="OneVision video: frames per clip, one run each (default 8 16)")
    parser.add_argument("--only", nargs="+", metavar="KEY",
                        help="run only these rows (e.g. divprune-256 dart-256 oracle-256); the unreduced and "
                             "full-length oracle rows always run")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="toy models (16 visual tokens) for smoke tests")
    parser.add_argument("--json", type=Path, help="also write every number here ({'runs': [one per table]})")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--readme", type=Path, nargs="?", const=Path("README.md"), default=None,
                        help="with --family onevision_video: put its tables between "
                             f"{README_MARKERS[0]} and {README_MARKERS[1]} of this file (default README.md)")
    args = parser.parse_args(argv)
    if args.readme is not None:
        text = args.readme.read_text() if args.readme.is_file() else ""
        if args.family != "onevision_video" or any(text.count(marker) != 1 for marker in README_MARKERS):
            parser.error(f"--readme needs --family onevision_video and a file holding {README_MARKERS[0]} and "
                         f"{README_MARKERS[1]} once each; got --family {args.family}, {args.readme}")
    torch.set_num_threads(args.threads)
    runs = []
    for name in FAMILIES if args.family == "all" else (args.family,):
        family_class, full, tiny = FAMILIES[name]
        shape = tiny if args.tiny else full
        family = family_class(shape)
        rounds = args.rounds if args.rounds is not None else shape["rounds"]
        decode_steps = args.decode_steps if args.decode_steps is not None else shape["decode_steps"]
        started = time.perf_counter()
        model = family.build(args.seed)
        built = time.perf_counter() - started
        sizes = {"qwen2_vl": args.qwen_sides, "onevision_video": args.frames}.get(name) or family.sides(model)
        for side in sizes:
            if name == "llava":
                ks = tuple(args.ks) if args.ks else shape["ks"]
            elif name == "onevision_video":
                ks = ()  # HoliTom's budgets: shape["retains"]
            else:
                patches = side // model.config.vision_config.patch_size
                n = patches * patches // model.config.vision_config.spatial_merge_size ** 2
                ks = tuple(round(keep * n) for keep in (args.keeps or shape["keeps"]))
            result = benchmark(args, family, model, side, ks, rounds, decode_steps)
            result["build_seconds"] = built
            runs.append(result)
            print(f"\n{result['title']}, {result['prompt']['image']} visual tokens:\n")
            print(markdown(result), flush=True)
        del model
        gc.collect()
    if args.readme is not None:
        tables_text = "\n\n".join(f"**{run['frames']} frames** ({run['prompt']['image']} visual tokens):\n\n"
                                  f"{markdown(run)}" for run in runs)
        sweep.update_readme(args.readme, tables_text, image=None, markers=README_MARKERS)
        print(f"updated {args.readme}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(runs=runs), indent=2, default=str))
        print(f"wrote {args.json}")
    return dict(runs=runs)


if __name__ == "__main__":
    main()
