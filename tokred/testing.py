"""Offline stand-ins for the quick starts: tiny Qwen2-VL and LLaVA-OneVision models with **random weights**
and processors built in code (no download, a second on CPU), to try tokred's calls end to end without the
real checkpoints. Their answers are noise: they are stand-ins, not models (the shipped trained LLaVA is
``tokred.reference.assets_dir() / "digits_vlm"``). The test suite builds its tiny models here too.

- :func:`qwen2_vl_standin`: ``(Qwen2VLForConditionalGeneration, Qwen2VLProcessor)``;
- :func:`onevision_standin`: ``(LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor)``.

The processors' tokenizer is a word-level vocabulary of the model's 128 ids (``w<id>`` words, every other
word is ``<unk>``) with the models' special tokens at their ids; the chat templates render the images or
videos of a user message first, then its text. Needs transformers (``tokred[hf]``).
"""
from __future__ import annotations

import torch

#: token ids of the tiny models (vocabulary 128): pad, bos, eos, unknown word
PAD, BOS, EOS, UNK = 0, 1, 2, 3
#: LLaVA-OneVision's video and image placeholders
VIDEO_TOKEN, IMAGE_TOKEN = 98, 99
#: Qwen2-VL's image and video placeholders and the vision start / end markers
QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END = 90, 91, 92, 93
VOCAB = 128

QWEN_TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'video' %}"
                 "<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                 "{% endfor %}")
ONEVISION_TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
                      "{% elif c['type'] == 'video' %}<video> {% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                      "{% endfor %}")


def _nontrivial_norms(model):
    """Norm weights uniform in [0.5, 1.5], so that a missing norm shows in the tests."""
    with torch.no_grad():
        for module in model.modules():
            if "Norm" in type(module).__name__ and getattr(module, "weight", None) is not None:
                torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    return model.eval()


def tiny_onevision(attn: str = "sdpa"):
    """A seeded LLaVA-OneVision with random weights (``specs/holitom.md`` §5): a 2-layer SigLIP tower on 56x56
    frames with 8x8 patches (a 7 x 7 grid, bilinearly pooled to 4 x 4 = 16 tokens per frame: the odd
    side exercises the ceiling) and a 4-layer Qwen2 language model (4 heads, 2 KV heads). A video of
    F frames fills 16F + 1 placeholders (token ``VIDEO_TOKEN``): its tokens, then one ``image_newline``."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    torch.manual_seed(0)
    tower = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=56, patch_size=8)
    text = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD)
    config = LlavaOnevisionConfig(vision_config=tower, text_config=text, image_token_id=IMAGE_TOKEN,
                                  video_token_id=VIDEO_TOKEN, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", image_grid_pinpoints=[[56, 56]])
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = attn
    return _nontrivial_norms(LlavaOnevisionForConditionalGeneration(config))


def tiny_qwen2_vl(kind: str = "qwen2_vl"):
    """A seeded Qwen2-VL (or Qwen2.5-VL, ``kind="qwen2_5_vl"``) with random weights: a 2-block vision
    encoder (14 px patches, 2 x 2 merge; 2.5-VL with 56 px windows and block 1 full attention) and
    a 4-layer language model with grouped-query attention and M-RoPE sections (2, 3, 3)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    torch.manual_seed(0)
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=BOS, eos_token_id=EOS,
                pad_token_id=PAD, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})
    ids = dict(image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_START,
               vision_end_token_id=QWEN_END)
    if kind == "qwen2_vl":
        config = Qwen2VLConfig(text_config=text, vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4,
                                                                    mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                                                                    temporal_patch_size=2), **ids)
        return _nontrivial_norms(Qwen2VLForConditionalGeneration(config))
    config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(
        depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=4, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]), **ids)
    return _nontrivial_norms(Qwen2_5_VLForConditionalGeneration(config))


def _tokenizer(specials: dict[int, str]):
    """A word-level tokenizer over the tiny models' ids: ``w<id>`` words, ``specials`` at their ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = {PAD: "<pad>", BOS: "<s>", EOS: "</s>", UNK: "<unk>", **specials}
    vocab = {names.get(i, f"w{i}"): i for i in range(VOCAB)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.add_special_tokens([names[i] for i in (PAD, BOS, EOS, UNK, *specials)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left")


def qwen2_vl_standin():
    """A stand-in for a Qwen2-VL checkpoint, offline: ``(model, processor)``, :func:`tiny_qwen2_vl` (random
    weights) and a Qwen2VLProcessor that resizes an image to at most 112 x 112 pixels (8 x 8 patches, 16
    merged tokens)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = _tokenizer({QWEN_IMAGE: "<|image_pad|>", QWEN_VIDEO: "<|video_pad|>", QWEN_START: "<|vision_start|>",
                            QWEN_END: "<|vision_end|>"})
    pixels = dict(patch_size=14, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 56 * 56,
                                                                            "longest_edge": 112 * 112})
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=QWEN_TEMPLATE)
    return tiny_qwen2_vl(), processor


def onevision_standin():
    """A stand-in for a LLaVA-OneVision checkpoint, offline: ``(model, processor)``, :func:`tiny_onevision`
    (random weights) and a LlavaOnevisionProcessor on 56 x 56 images and frames (49 tokens per image, 16 per
    frame after the model's pooling)."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    tokenizer = _tokenizer({VIDEO_TOKEN: "<video>", IMAGE_TOKEN: "<image>"})
    side = {"height": 56, "width": 56}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=side, image_grid_pinpoints=[[56, 56]]), tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=side), num_image_tokens=49,
        vision_feature_select_strategy="full", chat_template=ONEVISION_TEMPLATE, vision_aspect_ratio="anyres_max_1")
    return tiny_onevision(), processor
