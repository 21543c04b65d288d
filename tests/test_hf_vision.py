"""Hugging Face CLIP / SigLIP vision towers: against a slow reference forward, identities, outputs,
FLOPs, restoring, bad input."""
import math
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

transformers = pytest.importorskip("transformers")
from transformers import (CLIPModel, CLIPConfig, CLIPVisionConfig, CLIPVisionModel,  # noqa: E402
                          CLIPVisionModelWithProjection, SiglipVisionConfig, SiglipVisionModel)

import tokred  # noqa: E402
from helpers import brute_force_merge, brute_force_pitome  # noqa: E402
from tokred.adapters.hf_vision import VisionTower  # noqa: E402
from tokred.flops import FlopsReport  # noqa: E402

TINY = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3, image_size=32,
            patch_size=4)
MODELS = {
    "clip": (CLIPVisionModel, CLIPVisionConfig, "sdpa"),
    "clip_eager": (CLIPVisionModel, CLIPVisionConfig, "eager"),
    "clip_projection": (CLIPVisionModelWithProjection, CLIPVisionConfig, "sdpa"),
    "siglip": (SiglipVisionModel, SiglipVisionConfig, "sdpa"),
    "siglip_eager": (SiglipVisionModel, SiglipVisionConfig, "eager"),
}


def build(name, **overrides):
    model_class, config_class, attention = MODELS[name]
    torch.manual_seed(0)
    config = config_class(**{**TINY, "projection_dim": 24, **overrides}, attn_implementation=attention)
    return model_class(config).eval()


def tower_of(model):
    return model.vision_model if hasattr(model, "vision_model") else model


def outputs(out):
    """The tensors to compare: last_hidden_state and the pooled output (or its projection)."""
    pooled = out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output
    return out.last_hidden_state, pooled


def counted(fn):
    """FLOPs FlopCounterMode sees, with SDPA on its math backend (as in test_flops.py)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# the slow reference ----------------------------------------------------------------------------------

def _heads(t, num_heads):
    batch, n, _ = t.shape
    return t.view(batch, n, num_heads, -1).transpose(1, 2)


def reference_forward(model, images, merge, prop_attn=True):
    """A token-merging CLIP / SigLIP vision model written out: manual softmax attention with
    log(size) logits, ``merge(layer, keys, x, size, protected)`` per image after attention,
    CLIP's class-token pooler or SigLIP's attention-pooling head with log(size) logits.
    Returns (last_hidden_state, pooled or projected output)."""
    tower = tower_of(model)
    x = tower.embeddings(images)
    clip = hasattr(tower, "pre_layrnorm")
    if clip:
        x = tower.pre_layrnorm(x)
    batch, protected = x.shape[0], int(clip)
    size = torch.ones(batch, x.shape[1], 1)
    for layer, block in enumerate(tower.encoder.layers):
        attn, h = block.self_attn, block.layer_norm1(x)
        n = h.shape[1]
        q, k, v = (_heads(proj(h), attn.num_heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        logits = q @ k.transpose(-1, -2) * attn.scale
        if prop_attn:
            logits = logits + size.log()[:, None, None, :, 0]
        x = x + attn.out_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, n, -1))
        merged = [merge(layer, k.mean(1)[i], x[i], size[i], protected) for i in range(batch)]
        x, size = torch.stack([m[0] for m in merged]), torch.stack([m[1] for m in merged])
        x = x + block.mlp(block.layer_norm2(x))
    if clip:
        pooled = tower.post_layernorm(x[:, 0])
        if hasattr(model, "visual_projection"):
            pooled = model.visual_projection(pooled)
        return x, pooled
    x = tower.post_layernorm(x)
    head = tower.head
    mha = head.attention
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    q = _heads(head.probe.expand(batch, -1, -1) @ wq.T + bq, mha.num_heads)
    k, v = _heads(x @ wk.T + bk, mha.num_heads), _heads(x @ wv.T + bv, mha.num_heads)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + size.log()[:, None, None, :, 0]
    y = mha.out_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, 1, -1))
    y = y + head.mlp(head.layernorm(y))
    return x, y[:, 0]


def tome_merge(schedule):
    return lambda layer, keys, x, size, protected: brute_force_merge(keys, x, size, schedule[layer], protected)


def pitome_merge(keep, depth):
    def merge(layer, keys, x, size, protected):
        unprotected = x.shape[0] - protected  # PiToMe counts no class token
        r = math.floor(unprotected - unprotected * keep)
        margin = 0.75 - 0.75 * layer / depth
        return brute_force_pitome(keys, x, size, r, protected, margin, protect_low_energy=layer >= math.ceil(depth / 2))
    return merge


# correctness -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("r", [6, [10, 0, 7]])
def test_tome_matches_reference_forward(name, r, images):
    model, images = build(name), images[:2]  # the brute-force merge is slow
    schedule = r if isinstance(r, list) else [r] * 3
    with torch.no_grad():
        want = reference_forward(model, images, tome_merge(schedule))
        tokred.apply(model, tokred.ToMe(r=r))
        got = outputs(model(images))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
    trace = tokred.last_trace(model)
    prefix = 1 if name.startswith("clip") else 0
    assert trace.num_prefix == prefix and trace.grid == (8, 8)
    assert trace.sizes.sum(1).eq(64 + prefix).all()
    assert got[0].shape[1] == trace.final_tokens == 64 + prefix - sum(schedule)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_without_proportional_attention(name, images):
    model, images = build(name), images[:2]
    with torch.no_grad():
        want = reference_forward(model, images, tome_merge([5] * 3), prop_attn=False)
        tokred.apply(model, tokred.ToMe(r=5, prop_attn=False))
        for g, w in zip(outputs(model(images)), want):
            torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["clip", "siglip_eager"])
def test_pitome_matches_reference_forward(name, images):
    model, images = build(name), images[:2]
    with torch.no_grad():
        want = reference_forward(model, images, pitome_merge(0.8, 3), prop_attn=False)
        tokred.apply(model, tokred.PiToMe(keep=0.8))
        got = outputs(model(images))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
    trace = tokred.last_trace(model)
    prefix = trace.num_prefix
    assert trace.sizes.sum(1).eq(64 + prefix).all() and trace.sizes[:, :prefix].eq(1).all()
    assert got[0].shape[1] == trace.final_tokens < 50


@pytest.mark.parametrize("name", MODELS)
def test_identities_are_bit_identical(name, images):
    model = build(name)
    with torch.no_grad():
        want = model(images, output_hidden_states=True)
        for reducers in [(tokred.ToMe(r=0),), (tokred.PiToMe(keep=1.0),), ()]:
            tokred.apply(model, *reducers)
            got = model(images, output_hidden_states=True)
            assert all(torch.equal(g, w) for g, w in zip(outputs(got), outputs(want)))
            assert all(torch.equal(g, w) for g, w in zip(got.hidden_states, want.hidden_states))
            assert tokred.last_trace(model).tokens() == [want.last_hidden_state.shape[1]] * 3


@pytest.mark.parametrize("name", ["clip", "clip_projection"])
def test_class_token_stays_first_and_pools(name, images):
    model = tokred.apply(build(name), tokred.ToMe(r=[20, 15, 8]))
    with torch.no_grad():
        out = model(images)
    trace = tokred.last_trace(model)
    assert trace.sizes[:, 0].eq(1).all() and trace.source_maps[-1][:, 0].eq(0).all()
    tower = tower_of(model)
    pooled = tower.post_layernorm(out.last_hidden_state[:, 0])
    if name == "clip_projection":
        pooled = model.visual_projection(pooled)
    assert torch.equal(outputs(out)[1], pooled)
    with torch.no_grad():  # the class token entering the encoder is the untouched embedding
        first = tower.pre_layrnorm(tower.embeddings(images))[:, 0]
        assert torch.equal(model(images, output_hidden_states=True).hidden_states[0][:, 0], first)


def test_siglip_head_weights_tokens_by_size():
    """A token of size s is pooled like s copies of itself: the attention-pooling head given the
    tokens expanded by their sizes (unpatched head) gives the same pooled output."""
    model = build("siglip")
    head = type(model.head)(model.config).eval()
    head.load_state_dict(model.head.state_dict())
    torch.manual_seed(3)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokred.apply(model, tokred.ToMe(r=8))
        out = model(images)
        sizes = tokred.last_trace(model).sizes
        assert sizes.max() > 1
        for i in range(2):
            expanded = out.last_hidden_state[i].repeat_interleave(sizes[i].long(), dim=0)[None]
            torch.testing.assert_close(out.pooler_output[i], head(expanded)[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_hidden_states_have_decreasing_lengths(name, images):
    model = tokred.apply(build(name), tokred.ToMe(r=[6, 4, 2]))
    with torch.no_grad():
        out = model(images, output_hidden_states=True)
        full = 64 + int(name == "clip")
        assert [h.shape[1] for h in out.hidden_states] == [full, full - 6, full - 10, full - 12]
        if name == "clip":  # CLIP's last hidden state is the encoder output (no final norm)
            assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
        selected = model(images, output_hidden_states=[-2]).hidden_states  # LLaVA's way of asking
        assert selected[2].shape[1] == full - 10 and all(h is None for i, h in enumerate(selected) if i != 2)


def test_remove_restores_bit_for_bit(images):
    for name in ["clip_projection", "siglip"]:
        model = build(name)
        classes = [type(m) for m in model.modules()]
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            want = outputs(model(images))
            tokred.apply(model, tokred.ToMe(r=8))
            assert not torch.equal(outputs(model(images))[1], want[1])
            tokred.remove(model)
            assert all(torch.equal(g, w) for g, w in zip(outputs(model(images)), want))
        assert [type(m) for m in model.modules()] == classes
        assert not any(k.startswith("_tokred") for m in model.modules() for k in vars(m))
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_batch_equals_images_one_by_one():
    torch.manual_seed(5)
    images = torch.randn(4, 3, 32, 32)
    for name in ["clip", "siglip"]:
        model = tokred.apply(build(name), tokred.ToMe(r=(8, -0.5)))
        with torch.no_grad():
            batched = outputs(model(images))
            sources = tokred.last_trace(model).source_maps[-1]
            for i in range(4):
                single = outputs(model(images[i:i + 1]))
                for s, b in zip(single, batched):
                    torch.testing.assert_close(s[0], b[i], atol=1e-5, rtol=1e-5)
                assert torch.equal(tokred.last_trace(model).source_maps[-1][0], sources[i])


def test_inner_tower_and_interpolated_positions():
    """The inner vision model of a CLIPVisionModelWithProjection can be patched on its own, and
    interpolate_pos_encoding gives the grid of the actual input."""
    model = build("clip_projection")
    inner = tokred.apply(model.vision_model, tokred.ToMe(r=5))
    torch.manual_seed(2)
    images = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        inner(images, interpolate_pos_encoding=True)
    trace = tokred.last_trace(inner)
    assert trace.grid == (12, 10) and trace.layers[0].tokens_in == 121 and trace.tokens() == [116, 111, 106]
    assert counted(lambda: inner(images, interpolate_pos_encoding=True)) == tokred.flops(inner).total
    with pytest.raises(ValueError, match="already patched"):
        tokred.apply(model, tokred.ToMe(r=2))
    tokred.remove(inner)
    tokred.apply(model, tokred.ToMe(r=2))


def test_vision_tower_is_reusable_on_its_own(images):
    """The tower part a LLaVA adapter reuses: patch a tower module, get every trace, add FLOPs."""
    model = build("siglip")
    traces = []
    tower = VisionTower(model, tokred.ToMe(r=4), on_end=traces.append)
    tower.patch()
    try:
        with torch.no_grad():
            model(images)
        assert len(traces) == 1 and traces[0] is tower.trace and traces[0].tokens() == [60, 56, 52]
        report = FlopsReport()
        tower.add_flops(tower.trace, report)
        assert [part for _, part, _ in report.layers][:2] == ["patch_embed", "block0"]
        assert report.total == counted(lambda: model(images))
    finally:
        tower.unpatch()
    assert type(model.encoder.layers[0]).__name__ == "SiglipEncoderLayer"


# FLOPs ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["clip", "clip_projection", "siglip", "siglip_eager"])
@pytest.mark.parametrize("reducers", [(), (tokred.ToMe(r=7),), (tokred.PiToMe(keep=0.8),)])
def test_flops_match_the_flop_counter(name, reducers, images):
    model = tokred.apply(build(name), *reducers)
    assert counted(lambda: model(images)) == tokred.flops(model).total
    parts = [part for _, part, _ in tokred.flops(model).layers]
    assert parts[0] == "patch_embed" and ("head" in parts) == name.startswith("siglip")
    assert ("projection" in parts) == (name == "clip_projection")
    assert any(p.endswith(".reducer") for p in parts) == bool(reducers)


def test_flops_of_an_unpatched_model_leave_it_unpatched(images):
    model = build("siglip")
    full = tokred.flops(model, images).total
    assert full == counted(lambda: model(images))
    assert type(model.encoder).__name__ == "SiglipEncoder"
    tokred.apply(model, tokred.ToMe(r=8))
    assert tokred.flops(model, images).total < full


# bad input --------------------------------------------------------------------------------------------

def _assert_untouched(model, images, want):
    assert not any(type(m).__name__.startswith("Tokred") for m in model.modules())
    with torch.no_grad():
        assert torch.equal(outputs(model(images))[1], want)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_bad_schedule_leaves_the_model_untouched(name, images):
    model = build(name)
    with torch.no_grad():
        want = outputs(model(images))[1]
    with pytest.raises(ValueError, match="only 3 blocks"):
        tokred.apply(model, tokred.ToMe(r=[1] * 4))
    _assert_untouched(model, images, want)


def test_refused_forward_options(images):
    model = tokred.apply(build("clip_eager"), tokred.ToMe(r=2))
    with pytest.raises(ValueError, match="attention mask"):
        model(images, attention_mask=torch.zeros(1, 1, 65, 65))
    with pytest.raises(ValueError, match="output_attentions"):
        model(images, output_attentions=True)
    model.activation_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(images)
    model.activation_checkpointing_disable()
    model.eval()
    with torch.no_grad():  # a refused forward leaves no half-finished run behind
        model(images)
    assert tokred.last_trace(model).tokens() == [63, 61, 59]
    tokred.remove(model)
    with torch.no_grad():
        assert len(model(images, output_attentions=True).attentions) == 3


def test_unsupported_transformers_models():
    torch.manual_seed(0)
    config = CLIPConfig(vision_config=TINY, text_config=dict(hidden_size=32, intermediate_size=64,
                        num_hidden_layers=1, num_attention_heads=2))
    clip = CLIPModel(config)
    with pytest.raises(TypeError, match="no adapter for .*CLIPModel.*Hugging Face CLIP / SigLIP"):
        tokred.apply(clip, tokred.ToMe(r=1))


def test_training_backward_through_merges(images):
    model = tokred.apply(build("siglip"), tokred.ToMe(r=6)).train()
    model(images).pooler_output.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_adapters_do_not_import_transformers():
    """transformers is optional: importing the adapters and matching other models never imports it."""
    code = ("import sys, torch, tokred, tokred.adapters\n"
            "from tokred.adapters.hf_vision import HFVisionAdapter\n"
            "assert not HFVisionAdapter.matches(torch.nn.Linear(2, 2))\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_half_precision(dtype, images):
    model = build("siglip")
    with torch.no_grad():
        want = tokred.apply(build("siglip"), tokred.ToMe(r=6))(images).pooler_output
        tokred.apply(model.to(dtype), tokred.ToMe(r=6))
        got = model(images.to(dtype)).pooler_output
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert tokred.last_trace(model).sizes.sum(1).eq(64).all()
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.1)
