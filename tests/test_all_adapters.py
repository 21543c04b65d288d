"""Every vision reducer on every adapter: the identity settings are bit-identical, real settings
run, keep the protected tokens and account for every patch."""
import pytest
import torch

import tokred
from helpers import tiny_vit


def _open_clip():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    return open_clip.model.CLIP(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=4, width=48, layers=3,
                                                              head_width=16),
                                text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1)).eval()


def _hf(family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    kwargs = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3, image_size=32,
                  patch_size=4, attn_implementation="sdpa")
    if family == "clip":
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**kwargs)).eval()
    return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**kwargs)).eval()


MODELS = {
    "timm": (lambda: tiny_vit(init_values=0.1), lambda m, x: m(x), 1),
    "open_clip": (_open_clip, lambda m, x: m.encode_image(x), 1),
    "hf_clip": (lambda: _hf("clip"), lambda m, x: m(pixel_values=x).pooler_output, 1),
    "hf_siglip": (lambda: _hf("siglip"), lambda m, x: m(pixel_values=x).pooler_output, 0),
}
IDENTITIES = [tokred.ToMe(r=0), tokred.PiToMe(keep=1.0), tokred.Random(keep=1.0), tokred.Pool(stride=1),
              tokred.Thresholds()]
REDUCERS = [tokred.ToMe(r=6), tokred.PiToMe(keep=0.8), tokred.Random(keep=0.5, layer=1), tokred.Pool(stride=2),
            tokred.Thresholds(merge=0.3, prune=0.7)]


@pytest.fixture
def batch():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("name", MODELS)
def test_identity_settings_are_bit_identical(name, batch):
    build, run, _ = MODELS[name]
    model = build()
    with torch.no_grad():
        want = run(model, batch)
        for reducer in IDENTITIES:
            tokred.apply(model, reducer)
            assert torch.equal(run(model, batch), want), reducer


@pytest.mark.parametrize("reducer", REDUCERS, ids=lambda r: type(r).__name__)
@pytest.mark.parametrize("name", MODELS)
def test_every_reducer_runs(name, reducer, batch):
    build, run, prefix = MODELS[name]
    model = tokred.apply(build(), reducer)
    with torch.no_grad():
        out = run(model, batch)
    trace = tokred.last_trace(model)
    assert torch.isfinite(out).all()
    assert trace.tokens()[-1] < 64 + prefix
    final = trace.source_maps[-1]
    assert final[:, :prefix].eq(torch.arange(prefix)).all()  # protected tokens stay first
    if not isinstance(reducer, (tokred.Random, tokred.Thresholds)):  # nothing pruned: every patch is covered
        assert (final >= 0).all() and trace.sizes.sum(1).eq(64 + prefix).all()
