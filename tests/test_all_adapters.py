"""Every vision reducer on every adapter: the identity settings are bit-identical, real settings
run, keep the protected tokens and account for every patch."""
import pytest
import torch

import tokred
from helpers import tiny_vit
from tiny_families import EVA02, tiny_eva, tiny_torchvision_vit


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
    "timm_eva02": (lambda: tiny_eva(qkv_std=None, **EVA02), lambda m, x: m(x), 1),
    "timm_eva_dinov3": (lambda: tiny_eva(qkv_std=None, rope_type="dinov3", rope_rotate_half=True, num_reg_tokens=2,
                                         use_abs_pos_emb=False), lambda m, x: m(x), 3),
    "torchvision": (lambda: tiny_torchvision_vit(), lambda m, x: m(x), 1),
}
IDENTITIES = [tokred.ToMe(r=0), tokred.PiToMe(keep=1.0), tokred.Random(keep=1.0), tokred.Pool(stride=1),
              tokred.Thresholds(), tokred.DToMe()]
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
            tokens = tokred.last_trace(model).tokens()
            assert tokens == [tokred.last_trace(model).layers[0].tokens_in] * len(tokens), reducer


@pytest.mark.parametrize("name", MODELS)
def test_remove_restores_bit_for_bit(name, batch):
    """After tokred.remove: the same outputs, classes, state and no tokred attribute left."""
    build, run, _ = MODELS[name]
    model = build()
    classes = [type(m) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = run(model, batch)
        tokred.apply(model, tokred.ToMe(r=8))
        assert not torch.equal(run(model, batch), want)
        tokred.remove(model)
        assert torch.equal(run(model, batch), want)
    assert [type(m) for m in model.modules()] == classes
    assert not any(k.startswith("_tokred") for m in model.modules() for k in vars(m))
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


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


def _widest_keeps_all(traces) -> bool:
    """Some block where the image with the most tokens keeps them all and another image loses some
    (run alone): the batch is then no narrower there, only its narrower images change."""
    for records in zip(*(trace.layers for trace in traces)):
        widest = max(records, key=lambda record: record.tokens_in)
        if widest.removed == 0 and any(record.removed for record in records):
            return True
    return False


@pytest.mark.parametrize("reducer", [tokred.Thresholds(merge=0.9), tokred.Thresholds(merge=0.9, prune=0.6)],
                         ids=["merge", "merge_prune"])
@pytest.mark.parametrize("name", MODELS)
def test_per_token_reducer_batch_equals_images_alone(name, reducer):
    """A noise image keeps all its tokens while a constant one merges (and prunes) most of them:
    in a batch each image is reduced as if alone, and the trace counts each image's tokens."""
    build, run, _ = MODELS[name]
    model = tokred.apply(build(), reducer)
    torch.manual_seed(0)
    images = torch.cat([torch.randn(1, 3, 32, 32), torch.full((1, 3, 32, 32), 0.5)])
    with torch.no_grad():
        batched = run(model, images)
        trace = tokred.last_trace(model)
        alone, traces = [], []
        for i in range(2):
            alone.append(run(model, images[i:i + 1]))
            traces.append(tokred.last_trace(model))
    assert _widest_keeps_all(traces)
    torch.testing.assert_close(batched, torch.cat(alone), atol=1e-5, rtol=1e-4)
    per_image = [record.tokens_per_image or [record.tokens_out] * 2 for record in trace.layers]
    assert [list(counts) for counts in zip(*per_image)] == [t.tokens() for t in traces]
    assert trace.tokens() == [max(counts) for counts in per_image]


@pytest.mark.parametrize("reducer", [tokred.ToMe(r=6), tokred.PiToMe(keep=0.8),
                                     tokred.Thresholds(merge=0.3, prune=0.7)], ids=lambda r: type(r).__name__)
@pytest.mark.parametrize("name", MODELS)
def test_non_finite_signal_is_refused_and_the_model_stays_usable(name, reducer, batch):
    build, run, _ = MODELS[name]
    model = tokred.apply(build(), reducer)
    with torch.no_grad():
        want = run(model, batch)
        bad = batch.clone()
        bad[1, 0, 5, 7] = float("nan")
        message = f"^{type(reducer).__name__}: .*non-finite.*attention keys of vision block 0"
        with pytest.raises(ValueError, match=message):
            run(model, bad)
        assert model._tokred_adapter.vision_stage.run is None  # the failed forward left no half-done run
        assert torch.equal(run(model, batch), want)
        assert tokred.last_trace(model).batch_size == 2 and tokred.last_trace(model).tokens()[-1] < 64


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("reducer", REDUCERS + [tokred.DToMe(thresholds=0.5)], ids=str)
def test_an_empty_batch_gives_the_unpatched_models_empty_output(name, reducer, batch):
    """Where the unpatched model runs a batch of no images, the patched one gives the same (empty) output."""
    build, run, _ = MODELS[name]
    model = build()
    empty = batch[:0]
    with torch.no_grad():
        try:
            want = run(model, empty)
        except RuntimeError:  # e.g. timm Eva's rotary embeddings cannot reshape 0 elements: nothing to match
            pytest.skip(f"the unpatched {name} model fails on an empty batch")
        with tokred.applied(model, reducer):
            got = run(model, empty)
    assert got.shape == want.shape and got.dtype == want.dtype
