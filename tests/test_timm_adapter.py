"""ToMe on timm ViTs: against a slow reference forward, identities, variants, dtypes, bad input."""
import copy

import pytest
import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import ResPostBlock, VisionTransformer
from torch import nn

import tokred
from helpers import brute_force_merge, tiny_vit

VARIANTS = {
    "vit": {},
    "layerscale": dict(init_values=0.1),
    "qk_norm": dict(qk_norm=True),
    "registers": dict(reg_tokens=4),
    "no_class_token_avg": dict(class_token=False, global_pool="avg"),
    "avgmax_with_class": dict(global_pool="avgmax"),
    "scale_norm": dict(scale_attn_norm=True, init_values=0.2),
}


def distilled_vit():
    torch.manual_seed(0)
    return VisionTransformerDistilled(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3,
                                      num_classes=7).eval()


def build(name):
    return distilled_vit() if name == "distilled" else tiny_vit(**VARIANTS[name])


def tome_merge(schedule):
    """Per-layer brute-force ToMe merge for :func:`reference_forward`."""
    return lambda layer, keys, x, size, protected: brute_force_merge(keys, x, size, schedule[layer], protected)


def reference_forward(model, images, merge, prop_attn=True):
    """A token-merging ViT written out with the model's own sub-modules: manual softmax
    attention, LayerScale, q/k norm, ``merge(layer, keys, x, size, protected)`` per image after
    attention, timm's plain pooling."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    batch, protected = x.shape[0], model.num_prefix_tokens
    size = torch.ones(batch, x.shape[1], 1)
    for layer, block in enumerate(model.blocks):
        attn, h = block.attn, block.norm1(x)
        n = h.shape[1]
        q, k, v = attn.qkv(h).view(batch, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        logits = q @ k.transpose(-1, -2) * attn.scale
        if prop_attn:
            logits = logits + size.log()[:, None, None, :, 0]
        y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, n, -1)
        x = x + block.ls1(attn.proj(attn.norm(y)))
        merged = [merge(layer, k.mean(1)[i], x[i], size[i], protected) for i in range(batch)]
        x, size = torch.stack([m[0] for m in merged]), torch.stack([m[1] for m in merged])
        x = x + block.ls2(block.mlp(block.norm2(x)))
    x = model.norm(x)
    if isinstance(model, VisionTransformerDistilled):
        return (model.head(x[:, 0]) + model.head_dist(x[:, 1])) / 2
    tokens = x[:, protected:]
    mean = tokens.mean(1)  # timm's plain mean over the tokens left, as the original ToMe pools
    pooled = {"token": x[:, 0], "avg": mean, "avgmax": 0.5 * (tokens.amax(1) + mean)}[model.global_pool]
    return model.head(model.fc_norm(pooled))


@pytest.mark.parametrize("name", [*VARIANTS, "distilled"])
@pytest.mark.parametrize("r", [6, [10, 0, 7, 30]])
def test_matches_reference_forward(name, r, images):
    model = build(name)
    schedule = r if isinstance(r, list) else [r] * 4
    with torch.no_grad():
        want = reference_forward(model, images, tome_merge(schedule))
        tokred.apply(model, tokred.ToMe(r=r))
        got = model(images)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    trace = tokred.last_trace(model)
    assert trace.sizes.sum(1).eq(64 + model.num_prefix_tokens).all()
    prefix = model.num_prefix_tokens
    assert trace.sizes[:, :prefix].eq(1).all()  # protected tokens never merge and stay in front
    assert trace.source_maps[-1][:, :prefix].eq(torch.arange(prefix)).all()


def test_without_proportional_attention(images):
    model = tiny_vit()
    with torch.no_grad():
        want = reference_forward(model, images, tome_merge([5] * 4), prop_attn=False)
        tokred.apply(model, tokred.ToMe(r=5, prop_attn=False))
        torch.testing.assert_close(model(images), want, atol=2e-5, rtol=1e-4)


def test_unfused_attention_path(images):
    model = tiny_vit(init_values=0.3)
    for block in model.blocks:
        block.attn.fused_attn = False
    with torch.no_grad():
        want = reference_forward(model, images, tome_merge([6] * 4))
        tokred.apply(model, tokred.ToMe(r=6))
        torch.testing.assert_close(model(images), want, atol=2e-5, rtol=1e-4)


def _expand_by_size(x, size):
    """Repeat every token as many times as its size (one image)."""
    return x.repeat_interleave(size.long().flatten(), dim=0)


def test_proportional_attention_equals_duplicated_tokens():
    """A token of size s must attend and be attended like s copies of itself: the defining
    property of proportional attention, checked on the attention-pool (MAP) head."""
    model = tiny_vit(global_pool="map", class_token=False)
    torch.manual_seed(3)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokred.apply(model, tokred.ToMe(r=8))
        features = model.forward_features(images)
        pooled = model.forward_head(features, pre_logits=True)
        sizes = tokred.last_trace(model).sizes
        for i in range(2):
            expanded = _expand_by_size(features[i], sizes[i])[None]
            torch.testing.assert_close(pooled[i], model.attn_pool(expanded)[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", [*VARIANTS, "distilled"])
def test_r0_and_no_reducer_are_bit_identical(name, images):
    model = build(name)
    with torch.no_grad():
        want = model(images)
        for reducers in [(tokred.ToMe(r=0),), ()]:
            tokred.apply(model, *reducers)
            assert torch.equal(model(images), want)
            assert tokred.last_trace(model).tokens() == [64 + model.num_prefix_tokens] * 4


def test_apply_twice_replaces_and_applied_restores(images):
    model = tiny_vit()
    with torch.no_grad():
        tokred.apply(model, tokred.ToMe(r=8))
        tokred.apply(model, tokred.ToMe(r=2))
        assert sum(issubclass(c, nn.Module) and c.__name__.startswith("Tokred") for c in type(model.blocks[0]).__mro__) == 1
        model(images)
        assert tokred.last_trace(model).tokens() == [63, 61, 59, 57]
        with tokred.applied(model, tokred.ToMe(r=4)):
            model(images)
            assert tokred.last_trace(model).tokens() == [61, 57, 53, 49]
        assert tokred.reducers_of(model) == (tokred.ToMe(r=2),)
        unpatched = tiny_vit()
        with tokred.applied(unpatched, tokred.ToMe(r=4)):
            pass
        assert type(unpatched) is timm.models.vision_transformer.VisionTransformer


def test_batch_equals_images_one_by_one():
    torch.manual_seed(5)
    images = torch.randn(5, 3, 32, 32)
    model = tokred.apply(tiny_vit(init_values=0.2), tokred.ToMe(r=(8, -0.5)))
    with torch.no_grad():
        batched = model(images)
        batch_sources = tokred.last_trace(model).source_maps[-1]
        for i in range(5):
            single = model(images[i:i + 1])
            torch.testing.assert_close(single[0], batched[i], atol=1e-5, rtol=1e-5)
            assert torch.equal(tokred.last_trace(model).source_maps[-1][0], batch_sources[i])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype, images):
    model = tiny_vit(init_values=0.1)
    with torch.no_grad():
        want = tokred.apply(copy.deepcopy(model), tokred.ToMe(r=6))(images)
        tokred.apply(model.to(dtype), tokred.ToMe(r=6))
        got = model(images.to(dtype))
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert tokred.last_trace(model).sizes.sum(1).eq(65).all()
    torch.testing.assert_close(got.float(), want, atol=0.15, rtol=0.1)


def test_other_image_sizes():
    model = tiny_vit(dynamic_img_size=True)
    tokred.apply(model, tokred.ToMe(r=5))
    with torch.no_grad():
        model(torch.randn(2, 3, 48, 40))
    trace = tokred.last_trace(model)
    assert trace.grid == (12, 10)
    assert trace.layers[0].tokens_in == 121 and trace.tokens() == [116, 111, 106, 101]


def test_cap_is_noted_in_the_trace(images):
    model = tokred.apply(tiny_vit(), tokred.ToMe(r=[40, 40]))
    with torch.no_grad():
        model(images)
    trace = tokred.last_trace(model)
    assert trace.tokens() == [33, 17, 17, 17]  # (65 - 1) // 2 = 32, then (33 - 1) // 2 = 16
    assert len(trace.notes) == 2 and "capped at 32" in trace.notes[0] and "capped at 16" in trace.notes[1]


@pytest.mark.parametrize("overrides", [dict(class_token=False, global_pool="avg"), dict(global_pool="avgmax"),
                                       dict(global_pool="map", class_token=False)])
@pytest.mark.parametrize("reducer", [tokred.ToMe(r=8), tokred.Thresholds(merge=0.3, prune=0.7)],
                         ids=["tome", "thresholds"])
def test_forward_head_pools_features_with_their_own_sizes(overrides, reducer):
    """Features of an earlier forward_features call keep their token sizes for forward_head,
    whatever forward ran in between."""
    model = tokred.apply(tiny_vit(**overrides), reducer)
    torch.manual_seed(4)
    first, second = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model(first)
        features = model.forward_features(first)
        model.forward_features(second)
        torch.testing.assert_close(model.forward_head(features), want)
        torch.testing.assert_close(model.forward_head(model.forward_features(second)), model(second))


def test_forward_head_refuses_features_whose_sizes_it_cannot_know(images):
    model = tokred.apply(tiny_vit(class_token=False, global_pool="avg"), tokred.ToMe(r=8))
    with torch.no_grad():
        features = model.forward_features(images)
        with pytest.raises(ValueError, match="not the tensor forward_features returned"):
            model.forward_head(features.clone())
        assert torch.equal(model.forward_head(features), model(images))
        unreduced = torch.randn(3, 64, 48)  # as many tokens as no reduction leaves: each is one patch
        torch.testing.assert_close(model.forward_head(unreduced), tokred.remove(model).forward_head(unreduced))


# bad input -------------------------------------------------------------------------------------

def _assert_untouched(model, images, want):
    assert not any(type(m).__name__.startswith("Tokred") for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(images), want)


@pytest.mark.parametrize("make,error,match", [
    (lambda: tokred.ToMe(r=[1] * 5), ValueError, "only 4 blocks"),
    (lambda: "tome", TypeError, "reducers"),
    (lambda: tokred.ToMe(r=2), None, None),
])
def test_bad_reducers_leave_the_model_untouched(make, error, match, images):
    model = tiny_vit()
    with torch.no_grad():
        want = model(images)
    if error is None:  # two reducers at one stage
        with pytest.raises(ValueError, match="one reducer per stage"):
            tokred.apply(model, make(), make())
    else:
        with pytest.raises(error, match=match):
            tokred.apply(model, make())
    _assert_untouched(model, images, want)


def test_failed_reapply_keeps_the_previous_patch(images):
    model = tokred.apply(tiny_vit(), tokred.ToMe(r=3))
    with pytest.raises(ValueError):
        tokred.apply(model, tokred.ToMe(r=[1] * 9))
    assert tokred.reducers_of(model) == (tokred.ToMe(r=3),)


def test_unsupported_models():
    with pytest.raises(TypeError, match="Supported model families: .*timm VisionTransformer"):
        tokred.apply(nn.Linear(3, 3), tokred.ToMe(r=1))
    resnet = timm.create_model("resnet10t", pretrained=False)
    with pytest.raises(TypeError, match="no adapter for timm.models.resnet.ResNet"):
        tokred.apply(resnet, tokred.ToMe(r=1))
    assert type(resnet).__name__ == "ResNet"


def test_a_torch_compile_wrapper_is_refused_pointing_to_the_model_it_wraps(images):
    model = tiny_vit()
    compiled = torch.compile(model)
    with pytest.raises(TypeError, match=r"torch.compile wrapper .*VisionTransformer.*compiled\._orig_mod"):
        tokred.apply(compiled, tokred.ToMe(r=2))
    assert type(model) is VisionTransformer and tokred.reducers_of(model) == ()
    tokred.apply(compiled._orig_mod, tokred.ToMe(r=2))  # what the message says works
    assert tokred.reducers_of(model) == (tokred.ToMe(r=2),)


def test_unsupported_block_type(images):
    model = tiny_vit(block_fn=ResPostBlock)
    with torch.no_grad():
        want = model(images)
    with pytest.raises(TypeError, match="ResPostBlock"):
        tokred.apply(model, tokred.ToMe(r=2))
    _assert_untouched(model, images, want)


def test_attention_mask_with_reduction_is_refused(images):
    model = tokred.apply(tiny_vit(), tokred.ToMe(r=2))
    with pytest.raises(ValueError, match="attention mask"):
        model(images, attn_mask=torch.ones(65, 65, dtype=torch.bool))


def test_last_trace_errors():
    model = tiny_vit()
    with pytest.raises(ValueError, match="not patched"):
        tokred.last_trace(model)
    tokred.apply(model)
    with pytest.raises(ValueError, match="not run a forward"):
        tokred.last_trace(model)


def test_training_backward_through_merges(images):
    model = tokred.apply(tiny_vit(init_values=0.1, drop_path_rate=0.1), tokred.ToMe(r=6)).train()
    loss = model(images).logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
