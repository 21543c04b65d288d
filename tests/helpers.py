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
