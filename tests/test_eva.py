"""The adapter contract on timm Eva (EVA, EVA-02, RoPE ViTs): a written-out reference forward in
which the rotary rows follow the merged tokens, identities bit-exact, FLOPs against the counter,
batch == images one by one, exact removal, refusals that leave the model untouched."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tokred
from helpers import brute_force_merge
from tiny_families import EVA02, tiny_eva

VARIANTS = {
    "rope": {},
    "eva02": EVA02,
    "no_rope": dict(use_rot_pos_emb=False),
    "dinov3": dict(rope_type="dinov3", rope_rotate_half=True, num_reg_tokens=2, use_abs_pos_emb=False),
    "mixed_map": dict(rope_type="mixed", global_pool="map"),
}


def rotate(x, rows, half):
    """The rotary embedding written out: ``rows`` hold sin then cos; interleaved pairs
    (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), or the two halves with ``half``."""
    sin, cos = rows.chunk(2, dim=-1)
    if half:
        a, b = x.chunk(2, dim=-1)
        turned = torch.cat([-b, a], dim=-1)
    else:
        turned = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)
    return x * cos + turned * sin


def destination(group):
    """The token a ToMe group merged into: its B member (odd position), or its only member."""
    return next(t for t in group if t % 2 == 1) if len(group) > 1 else group[0]


def reference_forward(model, images, schedule):
    """ToMe on an Eva written out per image with the model's own sub-modules: manual softmax
    attention with log-size bias, the merge metric = keys before the rotation averaged over heads,
    and every token's rotary row = the row of the patch its ToMe destinations chain back to."""
    x = model.patch_embed(images)
    x, table = model._pos_embed(x)
    x = model.norm_pre(x)
    batch, prefix = x.shape[0], model.num_prefix_tokens
    size = torch.ones(batch, x.shape[1], 1)
    patch_of = [list(range(x.shape[1] - prefix)) for _ in range(batch)]  # rotary row of every patch token
    for layer, block in enumerate(model.blocks):
        attn, h = block.attn, block.norm1(x)
        n = h.shape[1]
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        q, k, v = torch.nn.functional.linear(h, attn.qkv.weight, bias).view(batch, n, 3, attn.num_heads, -1).permute(
            2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        metric = k.mean(1)
        if table is not None:
            rows = table[layer] if model.rope_mixed else table  # (heads, N, D) per block, or (N, D)
            rows = torch.stack([rows[..., patch_of[i], :] for i in range(batch)])
            rows = rows if rows.dim() == 4 else rows[:, None]
            half = attn.rotate_half
            q = torch.cat([q[:, :, :prefix], rotate(q[:, :, prefix:], rows, half)], dim=2)
            k = torch.cat([k[:, :, :prefix], rotate(k[:, :, prefix:], rows, half)], dim=2)
        logits = q @ k.transpose(-1, -2) * attn.scale + size.log()[:, None, None, :, 0]
        y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, n, -1)
        x = x + block.gamma_1 * attn.proj(attn.norm(y))
        merged = [brute_force_merge(metric[i], x[i], size[i], schedule[layer], prefix) for i in range(batch)]
        x, size = torch.stack([m[0] for m in merged]), torch.stack([m[1] for m in merged])
        for i, (_, _, groups) in enumerate(merged):
            patch_of[i] = [patch_of[i][destination(g) - prefix] for g in groups[prefix:]]
        x = x + block.gamma_2 * block.mlp(block.norm2(x))
    x = model.norm(x)
    if model.attn_pool is not None:
        pooled = model.attn_pool(x, attn_mask=size.log()[:, None, None, :, 0])
    else:
        tokens, weights = x[:, prefix:], size[:, prefix:]
        pooled = (tokens * weights).sum(1) / weights.sum(1)
    return model.head(model.fc_norm(pooled)), patch_of


@pytest.mark.parametrize("name", VARIANTS)
def test_tome_matches_the_reference_forward(name, images):
    images = images[:2]
    model = tiny_eva(**VARIANTS[name])
    schedule = [10, 0, 7, 30]
    with torch.no_grad():
        want, patch_of = reference_forward(model, images, schedule)
        tokred.apply(model, tokred.ToMe(r=schedule))
        got = model(images)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    trace = tokred.last_trace(model)
    prefix = model.num_prefix_tokens
    assert trace.sizes.sum(1).eq(64 + prefix).all() and trace.sizes[:, :prefix].eq(1).all()
    rows = model._tokred_adapter.stage.last_run.positions[:, prefix:] - prefix
    assert rows.tolist() == patch_of  # every token's rotary row: its destination's patch


def test_written_out_attention_matches_the_reference_forward(images):
    """With timm's fused attention off (``fused_attn=False``) tokred's attention is the written-out softmax
    with the log-size bias added to the scores, as timm's own."""
    images, model = images[:2], tiny_eva()
    for block in model.blocks:
        block.attn.fused_attn = False
    with torch.no_grad():
        want, _ = reference_forward(model, images, [10, 0, 7, 30])
        tokred.apply(model, tokred.ToMe(r=[10, 0, 7, 30]))
        torch.testing.assert_close(model(images), want, atol=2e-5, rtol=1e-4)


def test_the_rotary_rows_matter(images):
    """Guard for the reference test: the same merges with the rotary rows left in grid order give
    a different output, so the rows the adapter gathers are what the comparison checks."""
    images = images[:2]
    model = tiny_eva()
    with torch.no_grad():
        want, _ = reference_forward(model, images, [10, 0, 7, 30])
        table = model.rope.get_embed()
        model.rope.get_embed = lambda *args, **kwargs: table
        stale = tokred.apply(model, tokred.ToMe(r=[10, 0, 7, 30]))
        adapter = stale._tokred_adapter
        adapter.rope_rows = lambda rope, run: None if rope is None or run.positions is None else \
            rope[None, None, :run.positions.shape[1] - adapter.num_prefix].expand(run.positions.shape[0], 1, -1, -1)
        assert (model(images) - want).abs().max() > 0.05


@pytest.mark.parametrize("name", VARIANTS)
def test_identity_settings_are_bit_identical(name, images):
    model = tiny_eva(**VARIANTS[name])
    with torch.no_grad():
        want = model(images)
        for reducers in [(), (tokred.ToMe(r=0),), (tokred.PiToMe(keep=1.0),), (tokred.Thresholds(),),
                         (tokred.DToMe(),), (tokred.Random(keep=1.0),), (tokred.Pool(stride=1),)]:
            tokred.apply(model, *reducers)
            assert torch.equal(model(images), want), reducers
            assert tokred.last_trace(model).tokens() == [64 + model.num_prefix_tokens] * 4


def counted(fn):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name,reducer", [
    ("eva02", None), ("eva02", tokred.ToMe(r=7)), ("eva02", tokred.PiToMe(keep=0.8)),
    ("dinov3", tokred.Random(keep=0.3, layer=1)), ("mixed_map", tokred.Pool(stride=2)), ("mixed_map", tokred.ToMe(r=5)),
], ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_flops_match_the_flop_counter(name, reducer, images):
    """(DToMe is left out: its reducer overhead disagrees with the counter on timm's ViT too.)"""
    model = tokred.apply(tiny_eva(**VARIANTS[name]), *([reducer] if reducer else []))
    assert counted(lambda: model(images)) == tokred.flops(model).total


@pytest.mark.parametrize("reducer", [tokred.ToMe(r=(8, -0.5)), tokred.Thresholds(merge=0.9, prune=0.6),
                                     tokred.DToMe(thresholds=0.6)], ids=lambda r: type(r).__name__)
def test_batch_equals_images_one_by_one(reducer):
    """Per-token reducers reduce a constant image far more than a noise image: the batch then
    carries per-image rotary rows, and still computes what each image computes alone."""
    torch.manual_seed(5)
    images = torch.cat([torch.randn(1, 3, 32, 32), torch.full((1, 3, 32, 32), 0.5), torch.randn(1, 3, 32, 32) * 0.1])
    model = tokred.apply(tiny_eva(**VARIANTS["dinov3"]), reducer)
    with torch.no_grad():
        batched = model(images)
        counts = tokred.last_trace(model).layers[-1].tokens_per_image
        alone = []
        for i in range(len(images)):
            alone.append(model(images[i:i + 1]))
            if counts is not None:
                assert tokred.last_trace(model).tokens()[-1] == counts[i]
    torch.testing.assert_close(batched, torch.cat(alone), atol=1e-5, rtol=1e-4)
    if reducer.decides_per_token:
        assert counts is not None and len(set(counts)) > 1  # the images really were reduced differently


def test_forward_head_pools_features_with_their_own_sizes(images):
    model = tokred.apply(tiny_eva(), tokred.ToMe(r=8))
    with torch.no_grad():
        features = model.forward_features(images)
        model.forward_features(images[:1])
        torch.testing.assert_close(model.forward_head(features), model(images))


def _assert_untouched(model, images, want):
    assert not any(type(m).__name__.startswith("Tokred") for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(images), want)


@pytest.mark.parametrize("overrides,match", [
    (dict(use_post_norm=True), "EvaBlockPostNorm"),
    (dict(attn_type="rope"), "AttentionRope"),
])
def test_unsupported_blocks_are_refused(overrides, match, images):
    try:
        model = tiny_eva(**overrides)
    except TypeError as error:  # timm 1.0.20 cannot build post-norm Evas (EvaBlockPostNorm lacks swiglu_align_to)
        pytest.skip(f"this timm cannot build the model: {error}")
    with torch.no_grad():
        want = model(images)
    with pytest.raises(TypeError, match=match):
        tokred.apply(model, tokred.ToMe(r=2))
    _assert_untouched(model, images, want)


def test_unknown_parts_are_refused(images):
    """A block with a sub-module the adapter does not know (a newer timm) is refused, not run without it."""
    model = tiny_eva()
    model.blocks[1].attn.extra_norm = torch.nn.LayerNorm(48)
    with torch.no_grad():
        want = model(images)
    with pytest.raises(TypeError, match=r"block 1: .*timm 1\.0\.\d+ .*\(attn\.extra_norm\)"):
        tokred.apply(model, tokred.ToMe(r=2))
    _assert_untouched(model, images, want)


@pytest.mark.parametrize("make", [lambda: tokred.ToMe(r=[1] * 5), lambda: tokred.DToMe(thresholds=(0.5, 0.5))])
def test_bad_reducers_leave_the_model_untouched(make, images):
    model = tiny_eva()
    with torch.no_grad():
        want = model(images)
    with pytest.raises(ValueError):
        tokred.apply(model, make())
    _assert_untouched(model, images, want)


def test_gradient_checkpointing_is_refused_while_training(images):
    model = tokred.apply(tiny_eva(), tokred.ToMe(r=4))
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(images)
    with torch.no_grad():
        model(images)


def _naflexvit():
    from timm.models.naflexvit import NaFlexVit

    return NaFlexVit(embed_dim=24, depth=1, num_heads=2, num_classes=3)


def _timm_swin():
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=24, depths=(1,), num_heads=(2,))


def _torchvision_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2], num_heads=[2], window_size=[4, 4])


@pytest.mark.parametrize("build", [_naflexvit, _timm_swin, _torchvision_swin], ids=lambda f: f.__name__[1:])
def test_naflexvit_and_swin_are_refused_with_the_reason(build):
    model = build()
    reason = "variable-resolution packing" if "naflex" in build.__name__ else "hierarchical"
    families = "Supported model families: .*timm Eva.*torchvision VisionTransformer"
    with pytest.raises(TypeError, match=f"{reason}.*{families}"):
        tokred.apply(model, tokred.ToMe(r=1))
    assert not type(model).__name__.startswith("Tokred")
