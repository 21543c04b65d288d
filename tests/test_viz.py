"""tokred.viz: the source-trace picture (mean colour per token group, borders, pruned patches)."""
import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

import tokred
from tokred import viz

BORDER = (255, 255, 255)


@pytest.fixture(scope="module")
def traced():
    """A tiny ViT (8x8 grid of 4x4 patches) run once with ToMe(r=6); returns its trace."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=5).eval()
    tokred.apply(model, tokred.ToMe(r=6))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    return tokred.last_trace(model)


def patch_groups(trace, index=0, layer=-1):
    """Token groups as lists of patch indices (0..rows*cols-1), prefix tokens dropped."""
    groups = [[p - trace.num_prefix for p in g if p >= trace.num_prefix] for g in trace.sources(index, layer)]
    return [g for g in groups if g]


def centre(rendered, patch, cols, size):
    r, c = divmod(patch, cols)
    return tuple(np.asarray(rendered)[r * size + size // 2, c * size + size // 2])


def test_trace_is_merged(traced):
    assert traced.grid == (8, 8) and traced.num_prefix == 1
    assert traced.tokens() == [59, 53, 47, 41]
    assert max(len(g) for g in patch_groups(traced)) > 1


@pytest.mark.parametrize("layer", [0, 2, -1])
def test_regions_match_groups_and_borders(traced, layer):
    size, (rows, cols) = 8, traced.grid
    torch.manual_seed(3)
    image = torch.rand(3, 32, 32)
    rendered = viz.render_sources(image, traced, index=1, layer=layer, patch_size=size)
    assert rendered.size == (cols * size, rows * size) and rendered.mode == "RGB"
    pixels = np.asarray(rendered)
    groups = patch_groups(traced, 1, layer)
    assert sum(len(g) for g in groups) == rows * cols
    owner = {p: k for k, g in enumerate(groups) for p in g}
    # One flat fill per group, distinct between groups: regions == tokens covering patches.
    fills = [{centre(rendered, p, cols, size) for p in g} for g in groups]
    assert all(len(f) == 1 for f in fills)
    assert len(set.union(*fills)) == len(groups)
    # A border exactly where neighbouring patches belong to different tokens.
    for p in range(rows * cols):
        r, c = divmod(p, cols)
        if c + 1 < cols:
            edge = tuple(pixels[r * size + size // 2, (c + 1) * size - 1])
            assert (edge == BORDER) == (owner[p] != owner[p + 1]), (p, "right")
        if r + 1 < rows:
            edge = tuple(pixels[(r + 1) * size - 1, c * size + size // 2])
            assert (edge == BORDER) == (owner[p] != owner[p + cols]), (p, "below")


def test_fill_is_group_mean_colour(traced):
    """Constant-colour patches: each group's fill is the mean of its patches' colours."""
    rows, cols = traced.grid
    size = 4
    gen = torch.Generator().manual_seed(5)
    colours = torch.randint(0, 256, (rows * cols, 3), generator=gen)
    image = colours.view(rows, cols, 3).permute(2, 0, 1).repeat_interleave(size, 1).repeat_interleave(size, 2)
    rendered = viz.render_sources(image.to(torch.uint8), traced, index=0, patch_size=size)
    for group in patch_groups(traced):
        expected = colours[group].double().mean(0).round()
        for p in group:
            got = torch.tensor(centre(rendered, p, cols, size), dtype=torch.float64)
            assert torch.allclose(got, expected, atol=1), (group, got, expected)
    # Same picture from a float tensor and from a PIL image.
    as_float = viz.render_sources(image.float() / 255, traced, patch_size=size)
    as_pil = viz.render_sources(Image.fromarray(image.permute(1, 2, 0).to(torch.uint8).numpy()), traced, patch_size=size)
    assert np.array_equal(np.asarray(as_float), np.asarray(rendered))
    assert np.array_equal(np.asarray(as_pil), np.asarray(rendered))


def test_hand_made_trace_with_pruned_patch():
    """2x2 grid: patches 0 and 1 merged into token 1, patch 2 pruned, patch 3 is token 2."""
    trace = tokred.Trace(batch_size=1, num_prefix=1, grid=(2, 2), source_maps=[torch.tensor([[0, 1, 1, -1, 2]])])
    size = 16
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    image[:, :16, :16] = torch.tensor([200, 0, 0])[:, None, None]
    image[:, :16, 16:] = torch.tensor([0, 100, 0])[:, None, None]
    image[:, 16:, :16] = torch.tensor([250, 250, 250])[:, None, None]
    image[:, 16:, 16:] = torch.tensor([0, 0, 90])[:, None, None]
    pixels = np.asarray(viz.render_sources(image, trace, patch_size=size))
    assert tuple(pixels[8, 8]) == tuple(pixels[8, 24]) == (100, 50, 0)
    assert tuple(pixels[24, 24]) == (0, 0, 90)
    pruned = pixels[24, 8]
    assert pruned[0] == pruned[1] == pruned[2] and 0 < pruned[0] < 100  # grey, dark, still the image
    assert tuple(pixels[8, 15]) != BORDER  # inside the merged group: no border
    assert tuple(pixels[24, 15]) == BORDER and tuple(pixels[15, 8]) == BORDER and tuple(pixels[15, 24]) == BORDER


def test_no_grid_raises():
    trace = tokred.Trace(batch_size=1, num_prefix=1, grid=None, source_maps=[torch.tensor([[0, 1, 2]])])
    with pytest.raises(ValueError, match="grid"):
        viz.render_sources(torch.rand(3, 8, 8), trace)
    with pytest.raises(ValueError, match="grid"):
        viz.save_sources("unused.png", torch.rand(3, 8, 8), trace)


def test_mismatched_grid_raises(traced):
    bad = tokred.Trace(batch_size=2, num_prefix=1, grid=(4, 4), source_maps=traced.source_maps)
    with pytest.raises(ValueError, match="grid"):
        viz.render_sources(torch.rand(3, 32, 32), bad)


def test_save_sources_writes_png(traced, tmp_path):
    path = tmp_path / "sub" / "sources.png"
    viz.save_sources(path, torch.rand(3, 32, 32), traced, index=1, layers=[0, 1, 3], patch_size=8)
    with Image.open(path) as png:
        assert png.format == "PNG"
        png.load()
        width, height = png.size
    assert width > 4 * 64 and height > 64  # input + three 64-pixel panels side by side, titles above
    single = tmp_path / "last.png"
    viz.save_sources(single, Image.new("RGB", (50, 40), "red"), traced)
    with Image.open(single) as png:
        assert png.format == "PNG" and png.size[0] > 2 * 128


def test_importable_as_module():
    import tokred.viz as module

    assert module is tokred.viz is viz
