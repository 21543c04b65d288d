"""The adapter contract on torchvision's VisionTransformer: a written-out ToMe reference forward,
identities bit-exact, FLOPs against the counter, batch == images one by one, exact removal,
refusals that leave the model untouched."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tokred
from helpers import brute_force_merge
from tiny_families import tiny_torchvision_vit

pytest.importorskip("torchvision")


def reference_forward(model, images, schedule, prop_attn=True):
    """ToMe on a torchvision ViT written out per image with the model's own sub-modules: the packed
    in-projection, manual softmax attention with log-size bias, merge after attention, class token head."""
    x = model._process_input(images)
    x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1) + model.encoder.pos_embedding
    batch = x.shape[0]
    size = torch.ones(batch, x.shape[1], 1)
    for layer, block in enumerate(model.encoder.layers):
        attn, h = block.self_attention, block.ln_1(x)
        n = h.shape[1]
        q, k, v = (t.view(batch, n, attn.num_heads, -1).transpose(1, 2)
                   for t in F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1))
        logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if prop_attn:
            logits = logits + size.log()[:, None, None, :, 0]
        y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, n, -1)
        x = x + attn.out_proj(y)
        merged = [brute_force_merge(k.mean(1)[i], x[i], size[i], schedule[layer], 1) for i in range(batch)]
        x, size = torch.stack([m[0] for m in merged]), torch.stack([m[1] for m in merged])
        x = x + block.mlp(block.ln_2(x))
    return model.heads(model.encoder.ln(x)[:, 0])


@pytest.mark.parametrize("prop_attn", [True, False])
def test_tome_matches_the_reference_forward(prop_attn, images):
    model = tiny_torchvision_vit()
    schedule = [10, 0, 7, 30]
    with torch.no_grad():
        want = reference_forward(model, images[:2], schedule, prop_attn)
        tokred.apply(model, tokred.ToMe(r=schedule, prop_attn=prop_attn))
        got = model(images[:2])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    trace = tokred.last_trace(model)
    assert trace.sizes.sum(1).eq(65).all() and trace.sizes[:, 0].eq(1).all()


def counted(fn):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("reducer", [None, tokred.ToMe(r=(9, 0.5)), tokred.PiToMe(keep=0.8),
                                     tokred.Random(keep=0.3, layer=1), tokred.Pool(stride=(2, 3))],
                         ids=lambda r: type(r).__name__)
def test_flops_match_the_flop_counter(reducer, images):
    model = tokred.apply(tiny_torchvision_vit(representation_size=24), *([reducer] if reducer else []))
    assert counted(lambda: model(images)) == tokred.flops(model).total


def test_flops_of_a_convolutional_stem(images):
    from torchvision.models.vision_transformer import ConvStemConfig

    stem = [ConvStemConfig(out_channels=16, kernel_size=3, stride=2), ConvStemConfig(out_channels=24, kernel_size=3,
                                                                                      stride=2)]
    model = tokred.apply(tiny_torchvision_vit(conv_stem_configs=stem), tokred.ToMe(r=4))
    assert counted(lambda: model(images)) == tokred.flops(model).total


@pytest.mark.parametrize("reducer", [tokred.ToMe(r=(8, -0.5)), tokred.Thresholds(merge=0.9, prune=0.6)],
                         ids=lambda r: type(r).__name__)
def test_batch_equals_images_one_by_one(reducer):
    torch.manual_seed(5)
    images = torch.cat([torch.randn(1, 3, 32, 32), torch.full((1, 3, 32, 32), 0.5), torch.randn(1, 3, 32, 32) * 0.1])
    model = tokred.apply(tiny_torchvision_vit(), reducer)
    with torch.no_grad():
        batched = model(images)
        counts = tokred.last_trace(model).layers[-1].tokens_per_image
        alone = torch.cat([model(images[i:i + 1]) for i in range(len(images))])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)
    if reducer.decides_per_token:
        assert counts is not None and len(set(counts)) > 1  # the images really were reduced differently


def test_bad_input_leaves_the_model_untouched(images):
    model = tiny_torchvision_vit()
    with torch.no_grad():
        want = model(images)
    with pytest.raises(ValueError, match="only 4 blocks"):
        tokred.apply(model, tokred.ToMe(r=[1] * 5))
    model.encoder.layers[2].self_attention = torch.nn.MultiheadAttention(48, 3, kdim=24, vdim=24, batch_first=True)
    with pytest.raises(TypeError, match="block 2: .*separate q/k/v weights"):
        tokred.apply(model, tokred.ToMe(r=2))
    assert not any(type(m).__name__.startswith("Tokred") for m in model.modules())
    model = tiny_torchvision_vit()
    tokred.apply(model, tokred.ToMe(r=3))
    with pytest.raises(ValueError):
        tokred.apply(model, tokred.ToMe(r=[1] * 9))
    assert tokred.reducers_of(model) == (tokred.ToMe(r=3),)
    with torch.no_grad():
        assert torch.equal(tokred.remove(model)(images), want)
