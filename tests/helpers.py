"""Shared test helpers: tiny models built in code and the brute-force ToMe rule."""
import math

import torch
from timm.models.vision_transformer import VisionTransformer


def tiny_vit(**overrides) -> VisionTransformer:
    """A seeded ViT small enough for unit tests: 32x32 images, 4x4 patches, 64 patch tokens."""
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=7)
    kwargs.update(overrides)
    model = VisionTransformer(**kwargs).eval()
    for module in model.modules():  # non-trivial LayerScale so that dropping it would show
        if hasattr(module, "gamma"):
            torch.nn.init.uniform_(module.gamma, 0.5, 1.5)
    return model


def brute_force_merge(metric, x, size, r, protected):
    """The ToMe rule written out token by token for one image: returns merged x and sizes."""
    n = metric.shape[0]
    r = min(r, (n - protected) // 2)
    if r == 0:  # nothing to merge: the tokens stay as they are, in order
        return x, size, [[t] for t in range(n)]
    a = [i for i in range(protected, n) if i % 2 == 0]
    b = [j for j in range(protected, n) if j % 2 == 1]
    best = {}
    for i in a:
        sims = [(torch.nn.functional.cosine_similarity(metric[i], metric[j], dim=0).item(), j) for j in b]
        score = max(s for s, _ in sims)
        match = next(j for s, j in sims if s == score)  # first (lowest) B position among ties
        best[i] = (score, match)
    ranked = sorted(a, key=lambda i: (-best[i][0], i))
    merged = set(ranked[:r])
    groups = {t: [t] for t in range(protected)}
    for i in a:
        if i not in merged:
            groups[i] = [i]
    for j in b:
        groups[j] = [j] + [i for i in merged if best[i][1] == j]
    order = list(range(protected)) + [i for i in a if i not in merged] + b
    out_x = torch.stack([sum(x[t] * size[t] for t in groups[o]) / sum(size[t] for t in groups[o]) for o in order])
    out_size = torch.stack([sum(size[t] for t in groups[o]) for o in order])
    return out_x, out_size, [sorted(groups[o]) for o in order]


def brute_force_pitome(metric, x, size, r, protected, margin, alpha=1.0, protect_low_energy=True):
    """PiToMe's rule written out token by token for one image: returns merged x, sizes, groups."""
    n = metric.shape[0]
    r = min(r, (n - protected) // 2)
    if r == 0:
        return x, size, [[t] for t in range(n)]
    tokens = list(range(protected, n))

    def cos(i, j):
        return torch.nn.functional.cosine_similarity(metric[i], metric[j], dim=0).item()

    def elu(v):
        return v if v > 0 else alpha * (math.exp(v) - 1)

    energy = {i: sum(elu(cos(i, j) - margin) for j in tokens) / len(tokens) for i in tokens}
    order = sorted(tokens, key=lambda i: (-energy[i], i))
    candidates = order[:2 * r] if protect_low_energy else order
    a, b = candidates[0::2], candidates[1::2]
    best = []
    for i in a:
        scores = [cos(i, j) for j in b]
        best.append((max(scores), b[scores.index(max(scores))]))
    ranked = sorted(range(len(a)), key=lambda k: (-best[k][0], k))
    merged = {a[k]: best[k][1] for k in (range(len(a)) if protect_low_energy else ranked[:r])}
    survivors = [t for t in range(n) if t not in merged]
    groups = [[t] + [s for s, d in merged.items() if d == t] for t in survivors]
    out_x = torch.stack([sum(x[t] * size[t] for t in g) / sum(size[t] for t in g) for g in groups])
    out_size = torch.stack([sum(size[t] for t in g) for g in groups])
    return out_x, out_size, [sorted(g) for g in groups]


IMAGE_TOKEN = 99


def tiny_llava(kind: str = "llava", attn: str = "sdpa"):
    """A seeded LLaVA-family model with random weights: a 2-layer CLIP (SigLIP for OneVision) tower on
    32x32 images with 8x8 patches (16 visual tokens per crop) and a 4-layer Qwen2 language model
    with grouped-query attention (4 heads, 2 KV heads)."""
    from transformers import (CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaOnevisionConfig,
                              LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig)

    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                 image_size=32, patch_size=8)
    text = Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=0)
    common = dict(text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2)
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    if kind == "llava":
        config = LlavaConfig(vision_config=CLIPVisionConfig(**tower), vision_feature_select_strategy="default",
                             **common)
        model_class = LlavaForConditionalGeneration
    elif kind == "llava_next":
        config = LlavaNextConfig(vision_config=CLIPVisionConfig(**tower), image_grid_pinpoints=pinpoints,
                                 vision_feature_select_strategy="default", **common)
        model_class = LlavaNextForConditionalGeneration
    else:
        config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**tower), image_grid_pinpoints=pinpoints,
                                      vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                      **common)
        model_class = LlavaOnevisionForConditionalGeneration
    config._attn_implementation = attn
    config.text_config._attn_implementation = attn
    config.vision_config._attn_implementation = attn
    model = model_class(config).eval()
    with torch.no_grad():  # non-trivial norm weights, so that a missing norm (e.g. DART's final norm) would show
        for module in model.modules():
            if "Norm" in type(module).__name__ and getattr(module, "weight", None) is not None:
                torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    return model


def llava_inputs(model, prompts: list[tuple[list[int], list[int]]], seed: int = 0, image_sizes=None):
    """Left-padded inputs for ``prompts`` = [(text before the image, text after it)] with one image
    per sample; the number of placeholders per image is taken from the model itself."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(prompts)
    kind = type(model).__name__
    if kind.startswith("LlavaForConditional"):
        pixel_values = torch.randn(batch, 3, 32, 32, generator=generator)
        extra = {}
    else:
        image_sizes = image_sizes or [[32, 32]] * batch
        pixel_values = torch.randn(batch, 5, 3, 32, 32, generator=generator)
        extra = {"image_sizes": torch.tensor(image_sizes)}
    import tokred

    previous = tokred.reducers_of(model) if "_tokred_adapter" in model.__dict__ else None
    tokred.remove(model)  # the processor counts the unreduced tower's tokens
    try:
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=pixel_values, return_dict=True,
                                                      **({"image_sizes": extra["image_sizes"]} if extra else {})
                                                      ).pooler_output
    finally:
        if previous is not None:
            tokred.apply(model, *previous)
    rows = [before + [IMAGE_TOKEN] * f.shape[0] + after for (before, after), f in zip(prompts, features)]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, **extra)


QWEN_IMAGE, QWEN_START, QWEN_END = 90, 92, 93


def tiny_qwen2_vl(kind: str = "qwen2_vl"):
    """A seeded Qwen2-VL (or Qwen2.5-VL, ``kind="qwen2_5_vl"``) with random weights: a 2-block vision
    encoder (14 px patches, 2 x 2 merge; 2.5-VL with 56 px windows and block 1 full attention) and
    a 4-layer language model with grouped-query attention and M-RoPE sections (2, 3, 3)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    torch.manual_seed(0)
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})
    ids = dict(image_token_id=QWEN_IMAGE, video_token_id=91, vision_start_token_id=QWEN_START,
               vision_end_token_id=QWEN_END)
    if kind == "qwen2_vl":
        config = Qwen2VLConfig(text_config=text, vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4,
                                                                    mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                                                                    temporal_patch_size=2), **ids)
        model = Qwen2VLForConditionalGeneration(config)
    else:
        config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(
            depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=4, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]), **ids)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model = model.eval()
    with torch.no_grad():  # non-trivial norm weights, so that a missing norm would show
        for module in model.modules():
            if "Norm" in type(module).__name__ and getattr(module, "weight", None) is not None:
                torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    return model


def qwen_inputs(prompts: list[tuple[list[int], list[int]]], grids: list[list[int]], seed: int = 0) -> dict:
    """Left-padded Qwen2-VL inputs: one image per sample with grid [t, h, w] (in 14 px patches),
    ``<vision_start> image tokens <vision_end>`` between the text before and after it."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.tensor(grids)
    pixel_values = torch.randn(int(grid.prod(dim=-1).sum()), 3 * 2 * 14 * 14, generator=generator)
    rows = [before + [QWEN_START] + [QWEN_IMAGE] * (t * h * w // 4) + [QWEN_END] + after
            for (before, after), (t, h, w) in zip(prompts, grids)]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_grid_thw=grid,
                mm_token_type_ids=(input_ids == QWEN_IMAGE).int())


def next_step(inputs, out):
    """Inputs of one greedy decode step after ``out``: the argmax token and the grown attention mask."""
    token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
    return token, mask


def stripped(cache):
    """The same keys and values in a new cache object, without tokred's bookkeeping."""
    from transformers import DynamicCache

    plain = DynamicCache()
    for i, layer in enumerate(cache.layers):
        plain.update(layer.keys, layer.values, i)
    return plain
