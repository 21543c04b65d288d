"""Pictures of a trace: which input patches each token covers, drawn over the input image.

Every group of patches that one token stands for is filled with the group's mean colour, and
thin white borders separate patches of different tokens, so merged regions read as flat,
outlined segments (the familiar ToMe picture). Patches whose token was pruned are drawn as a
dark, grey version of the image.

    import tokred
    from tokred import viz

    tokred.apply(model, tokred.ToMe(r=16))
    model(images)                                   # images: the normalised batch
    trace = tokred.last_trace(model)
    viz.render_sources(pil_image, trace)            # PIL image of the last layer
    viz.save_sources("tome.png", pil_image, trace, layers=[2, 5, 8, 11])

Pass the image *before* normalisation (the picture is in display colours). Only Pillow is
needed; nothing here imports matplotlib.
"""
from __future__ import annotations

import colorsys
import math
import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BORDER = (255, 255, 255)
_PRUNED_BRIGHTNESS = 0.3
_GOLDEN = 0.618033988749895


def _to_pil(image) -> Image.Image:
    """A PIL RGB image from a PIL image, a (C, H, W) tensor or an (H, W[, C]) uint8 array."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.dim() != 3 or tensor.shape[0] not in (1, 3):
            raise ValueError(f"expected a (C, H, W) image tensor with C = 1 or 3, got shape {tuple(tensor.shape)}")
        if tensor.dtype == torch.uint8:
            array = tensor.numpy()
        elif tensor.is_floating_point():
            array = (tensor.float().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        else:
            raise ValueError(f"expected a float image tensor in [0, 1] or a uint8 one, got dtype {tensor.dtype}")
        array = np.repeat(array, 3, axis=0) if array.shape[0] == 1 else array
        return Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), "RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"expected an (H, W) or (H, W, C) uint8 array, got {image.dtype} of shape {image.shape}")
        return Image.fromarray(image).convert("RGB")
    raise TypeError(f"expected a PIL image, a (C, H, W) tensor or a uint8 array, got {type(image).__name__}")


def _patch_tokens(trace, index: int, layer: int) -> np.ndarray:
    """(rows, cols) token index covering each patch after ``layer`` (-1 when pruned)."""
    if trace.grid is None:
        raise ValueError("the trace has no patch grid (trace.grid is None), so its tokens cannot be drawn "
                         "over an image; this model's adapter does not record one")
    if not trace.source_maps:
        raise ValueError("the trace has no source maps (no layer ran)")
    rows, cols = trace.grid
    source_map = trace.source_maps[layer]
    if not 0 <= index < source_map.shape[0]:
        raise ValueError(f"image index {index} is out of range for a batch of {source_map.shape[0]}")
    patches = source_map[index, trace.num_prefix:].cpu().numpy()
    if patches.shape[0] != rows * cols:
        raise ValueError(f"the source map has {patches.shape[0]} patch entries after {trace.num_prefix} prefix "
                         f"tokens, but the grid {rows}x{cols} has {rows * cols} patches")
    return patches.reshape(rows, cols)


def _layer_index(trace, layer: int) -> int:
    count = len(trace.source_maps)
    if not -count <= layer < count:
        raise IndexError(f"layer {layer} is out of range; the trace has {count} layers")
    return layer % count


def _hue(token: int) -> np.ndarray:
    """A well-spread, deterministic colour for a token index."""
    return np.array(colorsys.hsv_to_rgb((token * _GOLDEN) % 1.0, 0.75, 1.0))


def render_sources(image, trace, index: int = 0, layer: int = -1, patch_size: int = 16,
                   tint: float = 0.0) -> Image.Image:
    """Draw which input patches each token covers after ``layer``, over ``image``.

    Args:
        image: the input picture in display colours (not normalised): a PIL image, a (C, H, W)
            torch tensor, float in [0, 1] (values outside are clipped) or uint8 in [0, 255],
            with C = 1 or 3, or an (H, W[, C]) uint8 numpy array. It is resized to the trace's
            grid, ``rows * patch_size`` by ``cols * patch_size`` pixels (bicubic; no resize if it
            already has that size).
        trace: a :class:`tokred.Trace` with a grid (``tokred.last_trace(model)``).
        index: which image of the traced batch.
        layer: which layer's source map (block index; -1 is the last layer).
        patch_size: displayed pixels per patch; need not equal the model's patch size.
        tint: 0 fills every group with exactly its mean colour; t in (0, 1] blends that with a
            distinct hue per token with weight t, which separates neighbouring groups of similar
            colour.

    Returns:
        An RGB image of ``cols * patch_size`` x ``rows * patch_size`` pixels: every group of
        patches covered by one token is filled with the mean colour of those patches' pixels,
        white borders (``max(1, patch_size // 8)`` pixels) separate patches of different tokens,
        and patches whose token was pruned are drawn as a darkened grey of the image.

    Raises:
        ValueError: the trace has no grid, or its source map does not match the grid.
    """
    if patch_size < 2:
        raise ValueError(f"patch_size must be at least 2 pixels, got {patch_size}")
    if not 0.0 <= tint <= 1.0:
        raise ValueError(f"tint must be in [0, 1], got {tint}")
    tokens = _patch_tokens(trace, index, _layer_index(trace, layer))
    rows, cols = tokens.shape
    size = (cols * patch_size, rows * patch_size)
    picture = _to_pil(image)
    if picture.size != size:
        picture = picture.resize(size, Image.BICUBIC)
    pixels = np.asarray(picture, dtype=np.float64)  # (H, W, 3)

    # Mean colour of every patch, then of every token's group (patches have equal pixel counts,
    # so the mean over patch means is the mean over the group's pixels).
    patch_mean = pixels.reshape(rows, patch_size, cols, patch_size, 3).mean(axis=(1, 3))
    flat_tokens = tokens.reshape(-1)
    flat_mean = patch_mean.reshape(-1, 3)
    covered = flat_tokens >= 0
    fill = np.zeros_like(flat_mean)
    if covered.any():
        ids, group = np.unique(flat_tokens[covered], return_inverse=True)
        totals = np.zeros((len(ids), 3))
        np.add.at(totals, group, flat_mean[covered])
        colours = totals / np.bincount(group, minlength=len(ids))[:, None]
        if tint > 0:
            hues = np.stack([_hue(int(t)) for t in ids]) * 255.0
            colours = (1 - tint) * colours + tint * hues
        fill[covered] = colours[group]
    # Pruned patches keep their own pixels, grey and dark.
    out = np.repeat(np.repeat(fill.reshape(rows, cols, 3), patch_size, axis=0), patch_size, axis=1)
    pruned = np.repeat(np.repeat(tokens < 0, patch_size, axis=0), patch_size, axis=1)
    grey = pixels @ np.array([0.299, 0.587, 0.114]) * _PRUNED_BRIGHTNESS
    out[pruned] = grey[pruned][:, None]

    # Borders between neighbouring patches of different tokens, straddling the shared edge.
    width = max(1, patch_size // 8)
    before, after = (width + 1) // 2, width // 2
    for r in range(rows):
        for c in range(cols):
            y0, x0 = r * patch_size, c * patch_size
            # Each segment runs on by the border width so that lines meet at corners.
            if c + 1 < cols and tokens[r, c] != tokens[r, c + 1]:
                edge = x0 + patch_size
                out[max(0, y0 - before):y0 + patch_size + after, edge - before:edge + after] = BORDER
            if r + 1 < rows and tokens[r, c] != tokens[r + 1, c]:
                edge = y0 + patch_size
                out[edge - before:edge + after, max(0, x0 - before):x0 + patch_size + after] = BORDER
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def save_sources(path, image, trace, index: int = 0, layers: Sequence[int] | None = None,
                 patch_size: int = 16, tint: float = 0.0) -> None:
    """Write a PNG: the original image next to one :func:`render_sources` panel per layer.

    Args:
        path: where to write the PNG (parent folders are created).
        image, trace, index, patch_size, tint: as for :func:`render_sources`.
        layers: block indices to draw (negative ones count from the end); None draws the last
            layer only. Each panel is titled "layer i: N tokens", N being the tokens (prefix
            tokens included) that leave block i. Up to five panels per row.
    """
    layers = [-1] if layers is None else list(layers)
    if not layers:
        raise ValueError("layers must name at least one layer (or be None for the last one)")
    panels = [render_sources(image, trace, index, layer, patch_size, tint) for layer in layers]
    width, height = panels[0].size
    original = _to_pil(image).resize((width, height), Image.BICUBIC)
    titles = ["input"]
    for layer in layers:
        i = _layer_index(trace, layer)
        if i < len(trace.layers):
            record = trace.layers[i]
            titles.append(f"layer {record.layer}: {record.tokens_out} tokens")
        else:
            source_map = trace.source_maps[i][index]
            titles.append(f"layer {i}: {int(source_map.max()) + 1} tokens")

    font_size = max(10, min(18, width // 14))
    font = _font(font_size)
    pad, title_height = 8, font_size + 8
    images = [original] + panels
    per_row = min(len(images), 5)
    grid_rows = math.ceil(len(images) / per_row)
    sheet = Image.new("RGB", (pad + per_row * (width + pad), pad + grid_rows * (title_height + height + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (panel, title) in enumerate(zip(images, titles)):
        x = pad + (k % per_row) * (width + pad)
        y = pad + (k // per_row) * (title_height + height + pad)
        draw.text((x, y), title, fill=(0, 0, 0), font=font)
        sheet.paste(panel, (x, y + title_height))
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    sheet.save(path, format="PNG")
