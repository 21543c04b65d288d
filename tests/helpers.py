"""Shared test helpers: tiny models built in code and the brute-force ToMe rule."""
import math

import torch
from timm.models.vision_transformer import VisionTransformer

from tokred.testing import (IMAGE_TOKEN, QWEN_END, QWEN_IMAGE, QWEN_START, QWEN_VIDEO,  # noqa: F401
                            VIDEO_TOKEN, tiny_onevision, tiny_qwen2_vl)


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
    """The ToMe rule written out token by token for one image: returns merged x, sizes and each output
    token's input tokens."""
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
    # unmerged A: by position after a protected token, else in descending best-match order (the original ToMe's)
    unmerged = [i for i in (a if protected else ranked) if i not in merged]
    order = list(range(protected)) + unmerged + b
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


def brute_force_segment_score(static, segments):
    """HoliTom's objective for a partition, counted position by position: per segment (s, e) with
    e > s, (e - s) times the positions whose every adjacent pair in s..e-1 is static."""
    positions = len(static[0]) if len(static) else 0
    return sum((e - s) * sum(all(static[f][n] for f in range(s, e)) for n in range(positions))
               for s, e in segments)


def all_partitions(frames, max_window):
    """Every partition of frames 0..frames-1 into contiguous segments of at most ``max_window`` frames."""
    if frames == 0:
        return [[]]
    out = []
    for length in range(1, min(frames, max_window) + 1):
        out += [p + [(frames - length, frames - 1)] for p in all_partitions(frames - length, max_window)]
    return out


def brute_force_dpc_knn(tokens, clusters, neighbours):
    """DPC-KNN written out token by token on ``torch.cdist``'s distances: centres (ascending) and each
    token's cluster; equal densities: the lower index is denser; score and distance ties: lower index."""
    n, channels = tokens.shape
    d = (torch.cdist(tokens.float(), tokens.float()) / math.sqrt(channels))
    k = min(neighbours, clusters)
    rho = [torch.exp(-(torch.sort(d[i]).values[:k] ** 2).mean()).item() for i in range(n)]
    dmax = d.max().item()

    def denser(j, i):
        return rho[j] > rho[i] or (rho[j] == rho[i] and j < i)

    delta = [min([d[i, j].item() for j in range(n) if denser(j, i)], default=dmax) for i in range(n)]
    gamma = [rho[i] * delta[i] for i in range(n)]
    centres = sorted(sorted(range(n), key=lambda i: (-gamma[i], i))[:clusters])
    cluster = []
    for i in range(n):
        if i in centres:
            cluster.append(centres.index(i))
        else:
            dist = [d[i, c].item() for c in centres]
            cluster.append(dist.index(min(dist)))
    return centres, cluster


def brute_force_cluster_merge(tokens, centres, cluster, beta):
    """Each centre t: beta * y_t + (1 - beta) * mean of its other members, or y_t alone."""
    out = []
    for t, c in enumerate(centres):
        members = [i for i, k in enumerate(cluster) if k == t and i != c]
        out.append(beta * tokens[c] + (1 - beta) * torch.stack([tokens[i] for i in members]).mean(0)
                   if members else tokens[c])
    return out


def brute_force_holitom(x, attention, segments, retain, tau, beta=0.6, neighbours=7):
    """HoliTom's outer stage on one video x (F, N, C), token by token, on the given segments: the
    output features in output order."""
    frames, n = x.shape[:2]
    sim = [[torch.nn.functional.cosine_similarity(x[f, i].float(), x[f + 1, i].float(), dim=0).item() for i in range(n)]
           for f in range(frames - 1)]
    statics = [[i for i in range(n) if e > s and all(sim[f][i] > tau for f in range(s, e))] for s, e in segments]
    saved = sum((e - s) * len(st) for (s, e), st in zip(segments, statics))
    total = frames * n
    share = min(1.0, retain / ((total - saved) / total))
    out = []
    for (s, e), still in zip(segments, statics):
        clusters = round(len(still) * share)
        if clusters:
            means = torch.stack([x[s:e + 1, i].float().mean(0) for i in still])
            centres, cluster = brute_force_dpc_knn(means, clusters, neighbours)
            out += brute_force_cluster_merge(means, centres, cluster, beta)
        moving = [i for i in range(n) if i not in still]
        k = math.ceil(len(moving) * share)
        for f in range(s, e + 1):
            top = sorted(sorted(moving, key=lambda i: (-attention[f, i].item(), i))[:k])
            out += [x[f, i].float() for i in top]
    return out


def brute_force_inner_merge(hidden, attention, visual, k):
    """HoliTom's inner merge as the reference loops: kept positions (ascending) and their hidden
    states after h_t <- (h_t + h_j) / 2 for the dropped j in ascending order."""
    candidates = [i for i, v in enumerate(visual.tolist()) if v]
    kept = sorted(candidates, key=lambda i: (-attention[i].item(), i))[:k]  # by attention, highest first
    dropped = sorted(set(candidates) - set(kept))
    h = hidden.clone().double()
    for j in dropped:
        sims = [torch.nn.functional.cosine_similarity(hidden[j].double(), hidden[t].double(), dim=0).item()
                for t in kept]
        t = kept[sims.index(max(sims))]
        h[t] = (h[t] + hidden[j].double()) / 2
    return sorted(kept), h




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




def onevision_video_inputs(prompts: list[tuple[list[int], list[int]]], frames: int, seed: int = 0,
                           videos_per_sample: list[int] | None = None) -> dict:
    """Left-padded inputs of :func:`tiny_onevision` for ``prompts`` = [(text before, text after)] with
    ``videos_per_sample[b]`` (default 1) videos of ``frames`` frames between them, each 16F + 1
    placeholders. ``pixel_values_videos`` is (videos, frames, 3, 56, 56), videos in prompt order."""
    generator = torch.Generator().manual_seed(seed)
    counts = videos_per_sample or [1] * len(prompts)
    pixel_values_videos = torch.randn(sum(counts), frames, 3, 56, 56, generator=generator)
    rows = [before + [VIDEO_TOKEN] * ((16 * frames + 1) * n) + after for (before, after), n in zip(prompts, counts)]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values_videos=pixel_values_videos)




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




def qwen_media_inputs(prompts: list[tuple[list[int], list[int]]], media: list[list[tuple[str, list[int]]]],
                      seed: int = 0) -> dict:
    """Left-padded Qwen2-VL inputs with images and videos: sample b is its text before, then each
    (``"image"`` or ``"video"``, grid [t, h, w] in 14 px patches) of ``media[b]`` as
    ``<vision_start> placeholders <vision_end>``, then its text after. Pixels are packed in prompt
    order per modality (``pixel_values`` / ``pixel_values_videos``, with their grids)."""
    generator = torch.Generator().manual_seed(seed)
    token = {"image": QWEN_IMAGE, "video": QWEN_VIDEO}
    rows, grids = [], {"image": [], "video": []}
    for (before, after), items in zip(prompts, media):
        row = list(before)
        for kind, (t, h, w) in items:
            row += [QWEN_START] + [token[kind]] * (t * h * w // 4) + [QWEN_END]
            grids[kind].append([t, h, w])
        rows.append(row + after)
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = dict(input_ids=input_ids, attention_mask=attention_mask,
               mm_token_type_ids=(input_ids == QWEN_IMAGE).int() + 2 * (input_ids == QWEN_VIDEO).int())
    for kind, pixels, grid_name in (("image", "pixel_values", "image_grid_thw"),
                                    ("video", "pixel_values_videos", "video_grid_thw")):
        if grids[kind]:
            grid = torch.tensor(grids[kind])
            out[pixels] = torch.randn(int(grid.prod(dim=-1).sum()), 3 * 2 * 14 * 14, generator=generator)
            out[grid_name] = grid
    return out


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


def clustered(n, tokens=16, dim=8, seed=0):
    """n images of ``tokens`` tokens; image i has 1 + i % 8 clusters, so content grows with i % 8."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        centres = torch.randn(1 + i % 8, dim, generator=generator)
        out.append(centres[torch.arange(tokens) % len(centres)] + 0.05 * torch.randn(tokens, dim, generator=generator))
    return torch.stack(out)
