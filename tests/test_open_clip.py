"""open_clip image towers: both attention implementations against a slow reference forward,
identities, pooling types, text tower untouched, FLOPs, bad input and the eval driver."""
import importlib.util
import json
import math
import socket
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIP, CustomTextCLIP  # noqa: E402
from open_clip.transformer import AttentionalPooler, Transformer, VisionTransformer  # noqa: E402

import tokred  # noqa: E402
from helpers import brute_force_merge  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEXT_CFG = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1)
VARIANTS = {
    "mha": {},
    "mha_layerscale_avg": dict(ls_init_value=0.5, pool_type="avg"),
    "custom": dict(block_type="custom"),
    "custom_all": dict(qk_norm=True, scale_heads=True, scale_attn_inner=True, scale_attn=True, scale_fc=True,
                       ls_init_value=0.5),
    "custom_avg_ln_after": dict(block_type="custom", pool_type="avg", final_ln_after_pool=True),
    "attn_pool": dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2),
    # open_clip's parallel pooler applies ln_post (output width) to the tokens: needs width == embed_dim
    "attn_pool_parallel": dict(attentional_pool="parallel", attn_pooler_queries=3, attn_pooler_heads=2,
                               block_type="custom", embed_dim=48),
    "attn_pool_cascade": dict(attentional_pool="cascade", attn_pooler_queries=3, attn_pooler_heads=2, embed_dim=48),
}


def tiny_clip(model_class=CLIP, embed_dim=32, **vision):
    """A seeded CLIP with a 3-block, 48-wide image tower on 32x32 images (64 patches + class token).
    Every 1-D parameter is perturbed so that zero biases and unit LayerScale/LayerNorm would show."""
    torch.manual_seed(0)
    vision_cfg = dict(image_size=32, patch_size=4, width=48, layers=3, head_width=16)
    vision_cfg.update(vision)
    model = model_class(embed_dim=embed_dim, vision_cfg=vision_cfg, text_cfg=TEXT_CFG).eval()
    with torch.no_grad():
        for name, param in model.visual.named_parameters():
            if param.dim() == 1 or "head_scale" in name:
                param.add_(0.2 * torch.randn_like(param))
    return model


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


@pytest.fixture
def text():
    torch.manual_seed(2)
    return torch.randint(0, TEXT_CFG["vocab_size"], (4, TEXT_CFG["context_length"]))


# the slow reference forward ---------------------------------------------------------------------
def _heads(t, heads):
    batch, n, _ = t.shape
    return t.view(batch, n, heads, -1).transpose(1, 2)


def _reference_attention(attn, h, size, prop_attn):
    """Self-attention of either block kind written out with a manual softmax; (output, keys)."""
    heads = attn.num_heads
    q, k, v = (_heads(t, heads) for t in (h @ attn.in_proj_weight.T + attn.in_proj_bias).chunk(3, dim=-1))
    custom = not isinstance(attn, nn.MultiheadAttention)
    if custom and attn.logit_scale is not None:
        q, k = nn.functional.normalize(q, dim=-1), nn.functional.normalize(k, dim=-1)
        logits = q @ k.transpose(-1, -2) * attn.logit_scale.clamp(max=attn.logit_scale_max).exp()
    else:
        if custom:
            q, k = attn.ln_q(q), attn.ln_k(k)
        logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if prop_attn:
        logits = logits + size.log()[:, None, None, :, 0]
    y = logits.softmax(-1) @ v
    if custom and attn.head_scale is not None:
        y = y * attn.head_scale
    y = y.transpose(1, 2).reshape(h.shape)
    if custom:
        y = attn.ln_inner(y)
    return attn.out_proj(y), k.mean(1)


def _reference_pooler(pool, x, size):
    """open_clip's AttentionalPooler written out, with log(size) on the logits."""
    mha = pool.attn
    q_w, k_w, v_w = ((mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight) if not mha._qkv_same_embed_dim
                     else mha.in_proj_weight.chunk(3))
    q_b, k_b, v_b = mha.in_proj_bias.chunk(3)
    x = pool.ln_k(x)
    query = pool.ln_q(pool.query).expand(x.shape[0], -1, -1)
    q = _heads(query @ q_w.T + q_b, mha.num_heads)
    k, v = _heads(x @ k_w.T + k_b, mha.num_heads), _heads(x @ v_w.T + v_b, mha.num_heads)
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + size.log()[:, None, None, :, 0]
    y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(query.shape)
    return mha.out_proj(y)


def reference_encode_image(model, images, schedule, prop_attn=True):
    """A token-merging open_clip image tower written out with the model's own sub-modules:
    manual softmax attention with log-size bias, brute-force ToMe merge per image after
    attention, size-weighted average / attention pooling, projection."""
    visual = model.visual
    x = visual._embeds(images)
    batch = x.shape[0]
    size = torch.ones(batch, x.shape[1], 1)
    for layer, block in enumerate(visual.transformer.resblocks):
        y, keys = _reference_attention(block.attn, block.ln_1(x), size, prop_attn)
        x = x + block.ls_1(getattr(block, "ln_attn", nn.Identity())(y))
        merged = [brute_force_merge(keys[i], x[i], size[i], schedule[layer], 1) for i in range(batch)]
        x, size = torch.stack([m[0] for m in merged]), torch.stack([m[1] for m in merged])
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    if visual.attn_pool is not None:
        if visual.attn_pool_type == "parallel":
            pooled = _reference_pooler(visual.attn_pool_contrastive, visual.ln_post(x), size)
        elif visual.attn_pool_type == "cascade":  # the second pooler sees the first one's queries
            tokens = _reference_pooler(visual.attn_pool, visual.ln_post(x), size)
            pooled = _reference_pooler(visual.attn_pool_contrastive, tokens, torch.ones(*tokens.shape[:2], 1))
        else:
            pooled = visual.ln_post(_reference_pooler(visual.attn_pool, x, size))
            pooled = pooled[:, 0] if visual.pool_type == "tok" else pooled[:, 1:].mean(1)
    else:
        mean = lambda t: (t[:, 1:] * size[:, 1:]).sum(1) / size[:, 1:].sum(1)  # noqa: E731
        if visual.pool_type == "tok":
            pooled = visual.ln_post(x)[:, 0]
        elif visual.final_ln_after_pool:
            pooled = visual.ln_post(mean(x))
        else:
            pooled = mean(visual.ln_post(x))
    return pooled @ visual.proj


@pytest.mark.parametrize("name", VARIANTS)
def test_matches_reference_forward(name, images):
    images = images[:2]  # the brute-force merge is slow
    model = tiny_clip(**VARIANTS[name])
    schedule = [9, 0, 12]
    with torch.no_grad():
        want = reference_encode_image(model, images, schedule)
        tokred.apply(model, tokred.ToMe(r=schedule))
        got = model.encode_image(images)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    trace = tokred.last_trace(model)
    assert trace.tokens() == [56, 56, 44] and trace.grid == (8, 8)
    assert trace.sizes.sum(1).eq(65).all() and trace.sizes[:, 0].eq(1).all()
    assert trace.source_maps[-1][:, 0].eq(0).all()  # the class token is never merged and stays first


def test_scaled_cosine_attention_matches_reference(images):
    """open_clip 3.3's own scaled-cosine forward fails (torch.bmm on 4-D tensors); tokred's runs it on SDPA."""
    model, images = tiny_clip(scaled_cosine_attn=True), images[:2]
    with torch.no_grad():
        want = reference_encode_image(model, images, [5, 5, 5])
        tokred.apply(model, tokred.ToMe(r=5))
        torch.testing.assert_close(model.encode_image(images), want, atol=2e-5, rtol=1e-4)


def test_written_out_attention_matches_reference(images):
    """With ``use_fsdpa`` off, open_clip's custom attention is a written-out softmax; tokred's follows it
    (the log-size bias added to the scores) and matches the reference like the SDPA path."""
    model, images = tiny_clip(**VARIANTS["custom_all"]), images[:2]
    for module in model.visual.modules():
        if hasattr(module, "use_fsdpa"):
            module.use_fsdpa = False
    with torch.no_grad():
        want = reference_encode_image(model, images, [9, 0, 12])
        tokred.apply(model, tokred.ToMe(r=[9, 0, 12]))
        torch.testing.assert_close(model.encode_image(images), want, atol=2e-5, rtol=1e-4)


def test_without_proportional_attention(images):
    model, images = tiny_clip(), images[:2]
    with torch.no_grad():
        want = reference_encode_image(model, images, [6] * 3, prop_attn=False)
        tokred.apply(model, tokred.ToMe(r=6, prop_attn=False))
        torch.testing.assert_close(model.encode_image(images), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", VARIANTS)
def test_identity_settings_are_bit_identical(name, images, text):
    model = tiny_clip(**VARIANTS[name])
    with torch.no_grad():
        want, want_text = model.encode_image(images), model.encode_text(text)
        for reducers in [(tokred.ToMe(r=0),), (tokred.PiToMe(keep=1.0),), ()]:
            tokred.apply(model, *reducers)
            assert torch.equal(model.encode_image(images), want)
            assert tokred.last_trace(model).tokens() == [65] * 3
        tokred.apply(model, tokred.ToMe(r=8))
        model.encode_image(images)
        assert torch.equal(model.encode_text(text), want_text)  # the text tower is untouched


@pytest.mark.parametrize("name", ["mha", "custom_all", "attn_pool"])
def test_pitome_runs_and_sizes_add_up(name, images):
    model = tokred.apply(tiny_clip(**VARIANTS[name]), tokred.PiToMe(keep=0.8))
    with torch.no_grad():
        out = model.encode_image(images)
    assert out.shape == (3, 32) and torch.isfinite(out).all()
    trace = tokred.last_trace(model)
    expected, patches = [], 64
    for _ in range(3):  # every block removes floor(T - T * keep) tokens, T not counting the class token
        patches -= math.floor(patches - patches * 0.8)
        expected.append(1 + patches)
    assert trace.tokens() == expected
    assert trace.sizes.sum(1).eq(65).all() and trace.sizes[:, 0].eq(1).all()


def test_custom_text_clip_and_the_bare_image_tower(images):
    model = tiny_clip(CustomTextCLIP, block_type="custom")
    text = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        want, want_text = model.encode_image(images), model.encode_text(text)
        tokred.apply(model, tokred.ToMe(r=6))
        reduced = model.encode_image(images)
        assert torch.equal(model.encode_text(text), want_text)
        tokred.remove(model)
        visual = tokred.apply(model.visual, tokred.ToMe(r=6))
        assert torch.equal(visual(images), reduced)
        assert tokred.last_trace(visual).tokens() == [59, 53, 47]
        tokred.remove(visual)
        assert torch.equal(model.encode_image(images), want)
    assert type(model.visual) is VisionTransformer


def test_patching_the_tower_then_the_clip_patches_once(images):
    model = tiny_clip()
    with torch.no_grad():
        want = model.encode_image(images)
        tokred.apply(model.visual, tokred.ToMe(r=2))
        tokred.apply(model, tokred.ToMe(r=4))
        model.encode_image(images)
        assert tokred.last_trace(model).tokens() == [61, 57, 53]
        assert sum(c.__name__.startswith("Tokred") for c in type(model.visual).__mro__) == 1
        assert vars(model.visual)["_tokred_adapter"] is vars(model)["_tokred_adapter"]
        tokred.remove(model)
        assert torch.equal(model.encode_image(images), want)
    assert type(model.visual) is VisionTransformer and "_tokred_adapter" not in vars(model.visual)


def test_remove_restores_bit_for_bit(images):
    model = tiny_clip(ls_init_value=0.3)
    classes = [type(m) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model.encode_image(images)
        tokred.apply(model, tokred.ToMe(r=8))
        assert not torch.equal(model.encode_image(images), want)
        tokred.remove(model)
        assert torch.equal(model.encode_image(images), want)
    assert [type(m) for m in model.modules()] == classes
    assert not any(k.startswith("_tokred") for m in model.modules() for k in vars(m))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_attention_pool_weights_tokens_like_duplicates(images):
    """A merged token of size s must pull on the attention pooler like s copies of itself."""
    model = tokred.apply(tiny_clip(**VARIANTS["attn_pool"]), tokred.ToMe(r=10))
    visual, seen = model.visual, {}

    def keep(name):
        def hook(module, args, out):
            seen.setdefault(name, out)  # returns None: the output is not replaced
        return hook

    visual.transformer.register_forward_hook(keep("tokens"))
    visual.ln_post.register_forward_hook(keep("pooled"))
    with torch.no_grad():
        model.encode_image(images)
        sizes = tokred.last_trace(model).sizes
        assert sizes.max() > 1
        for i in range(3):
            expanded = seen["tokens"][i].repeat_interleave(sizes[i].long(), dim=0)[None]
            torch.testing.assert_close(seen["pooled"][i], visual.ln_post(visual.attn_pool(expanded))[0],
                                       atol=1e-5, rtol=1e-4)


def test_sequence_first_transformer(images):
    """A transformer run with batch_first=False (LND blocks) gives the same numbers."""
    model = tiny_clip(ls_init_value=0.5)
    with torch.no_grad():
        want_full = model.encode_image(images)
        want = tokred.apply(model, tokred.ToMe(r=7)).encode_image(images)
        tokred.remove(model)
        seq_first = Transformer(48, 3, 3, ls_init_value=0.5, batch_first=False)
        seq_first.load_state_dict(model.visual.transformer.state_dict())
        model.visual.transformer = seq_first.eval()
        full = model.encode_image(images)
        torch.testing.assert_close(full, want_full, atol=1e-5, rtol=1e-5)
        tokred.apply(model, tokred.ToMe(r=0))
        assert torch.equal(model.encode_image(images), full)
        tokred.apply(model, tokred.ToMe(r=7))
        torch.testing.assert_close(model.encode_image(images), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["mha", "custom_all"])
def test_half_precision(name, images):
    model = tiny_clip(**VARIANTS[name])
    with torch.no_grad():
        want = tokred.apply(model, tokred.ToMe(r=6)).encode_image(images)
        got = model.to(torch.bfloat16).encode_image(images.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16 and tokred.last_trace(model).sizes.sum(1).eq(65).all()
    torch.testing.assert_close(got.float(), want, atol=0.15, rtol=0.1)


def test_training_backward_through_merges(images):
    model = tokred.apply(tiny_clip(block_type="custom", qk_norm=True), tokred.ToMe(r=6)).train()
    model.encode_image(images).square().mean().backward()
    blocks = model.visual.transformer.resblocks
    assert all(torch.isfinite(p.grad).all() for p in model.visual.parameters() if p.grad is not None)
    assert blocks[0].attn.in_proj_weight.grad.abs().sum() > 0


# FLOPs ------------------------------------------------------------------------------------------
def counted(fn):
    """FLOPs FlopCounterMode sees (SDPA on its math backend, whose matmuls the counter sees)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


FLOPS_CASES = [(name, reducers) for name in ["mha", "custom_all", "attn_pool", "attn_pool_parallel",
                                             "attn_pool_cascade", "none_pool"]
               for reducers in [(), (tokred.ToMe(r=7),), (tokred.PiToMe(keep=0.8),)]]
FLOPS_CASES += [("mha", (tokred.Random(keep=0.3, layer=1),)), ("attn_pool", (tokred.Pool(stride=(2, 3)),)),
                ("custom_avg_ln_after", (tokred.Pool(stride=2, layer=1),))]


@pytest.mark.parametrize("name,reducers", FLOPS_CASES)
def test_flops_match_the_flop_counter(name, reducers, images):
    vision = dict(pool_type="none") if name == "none_pool" else VARIANTS[name]
    model = tokred.apply(tiny_clip(**vision), *reducers)
    assert counted(lambda: model.encode_image(images)) == tokred.flops(model).total
    report = tokred.flops(model)
    assert set(report.stages) == {"vision"}
    if reducers and isinstance(reducers[0], (tokred.ToMe, tokred.PiToMe)):
        assert any(part.endswith(".reducer") for _, part, _ in report.layers)


def test_flops_of_an_unpatched_model_and_reduction(images):
    model = tiny_clip()
    full = tokred.flops(model, images)
    assert full.total == counted(lambda: model(images)) and type(model.visual) is VisionTransformer
    assert [part for _, part, _ in full.layers] == ["patch_embed", "block0", "block1", "block2", "head"]
    tokred.apply(model, tokred.ToMe(r=8))
    assert tokred.flops(model, images).total < full.total


# bad input --------------------------------------------------------------------------------------
def _assert_untouched(model, images, want):
    assert not any(type(m).__name__.startswith("Tokred") for m in model.modules())
    assert "_tokred_adapter" not in vars(model)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), want)


def test_schedule_longer_than_depth_leaves_the_model_untouched(images):
    model = tiny_clip()
    with torch.no_grad():
        want = model.encode_image(images)
    with pytest.raises(ValueError, match="only 3 blocks"):
        tokred.apply(model, tokred.ToMe(r=[1, 1, 1, 1]))
    _assert_untouched(model, images, want)


def test_unsupported_attention_pool_is_refused_at_apply(images):
    class OtherPooler(AttentionalPooler):
        def forward(self, x):
            return super().forward(x) * 2

    model = tiny_clip(**VARIANTS["attn_pool"])
    pool = model.visual.attn_pool
    pool.__class__ = OtherPooler
    with torch.no_grad():
        want = model.encode_image(images)
    with pytest.raises(ValueError, match="OtherPooler"):
        tokred.apply(model, tokred.ToMe(r=4))
    _assert_untouched(model, images, want)
    tokred.apply(model)  # without a reducer it only records a trace
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), want)


def test_unsupported_towers_and_blocks(images):
    resnet_clip = CLIP(embed_dim=32, vision_cfg=dict(layers=(1, 1, 1, 1), width=8, image_size=32, head_width=8),
                       text_cfg=TEXT_CFG)
    with pytest.raises(TypeError, match="ModifiedResNet"):
        tokred.apply(resnet_clip, tokred.ToMe(r=2))
    assert "_tokred_adapter" not in vars(resnet_clip)

    class MyBlock(type(tiny_clip().visual.transformer.resblocks[0])):
        def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
            return super().forward(q_x, k_x, v_x, attn_mask) + 0

    model = tiny_clip()
    model.visual.transformer.resblocks[1].__class__ = MyBlock
    with torch.no_grad():
        want = model.encode_image(images)
    with pytest.raises(TypeError, match="block 1 .*MyBlock"):
        tokred.apply(model, tokred.ToMe(r=2))
    _assert_untouched(model, images, want)


def test_gradient_checkpointing_with_reduction_is_refused(images):
    model = tokred.apply(tiny_clip(), tokred.ToMe(r=4)).train()
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="checkpointing"):
        model.encode_image(images)
    with torch.no_grad():
        assert model.encode_image(images).shape == (3, 32)  # fine without gradients


# evaluation driver ------------------------------------------------------------------------------
@pytest.fixture
def eval_driver(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    spec = importlib.util.spec_from_file_location("open_clip_eval", REPO / "evals" / "open_clip_eval.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_eval_driver_runs_offline_on_tiny(eval_driver, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert eval_driver.main(["--tiny", "--reducers", "none,tome:r=4,pitome:keep=0.9", "--out", str(out),
                             "--no-progress", "--batch-size", "16"]) == 0
    report = json.loads(out.read_text())
    rows = {row["reducer"]: row for row in report["results"]}
    assert list(rows) == ["none", "tome:r=4", "pitome:keep=0.9"]
    assert rows["none"]["flops_ratio"] == 1.0 and rows["none"]["zero_shot"]["agreement"] == 1.0
    assert rows["none"]["retrieval"]["image_to_text_agreement"] == 1.0
    assert rows["tome:r=4"]["flops_ratio"] < 1.0 and rows["tome:r=4"]["tokens_final"] == 65 - 12
    assert 0.0 <= rows["tome:r=4"]["zero_shot"]["top1"] <= 1.0
    assert rows["pitome:keep=0.9"]["retrieval"]["num_captions"] == 24
    assert "tome:r=4" in capsys.readouterr().out


def test_eval_driver_reads_image_folders_and_caption_files(eval_driver, tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    lines = []
    for name in ("golden_retriever", "tabby_cat"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(2):
            pixels = (torch.rand(40, 40, 3) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
            lines += [f"data/{name}/{i}.png\ta {name} {i}", f"data/{name}/{i}.png\tanother caption {name} {i}"]
    (tmp_path / "captions.tsv").write_text("\n".join(lines) + "\n")
    args = eval_driver.parse_args(["--tiny", "--data", str(tmp_path / "data"),
                                   "--retrieval", str(tmp_path / "captions.tsv"), "--limit", "3"])
    model, preprocess, tokenizer = eval_driver.tiny_model()
    zero_shot = eval_driver.zero_shot_task(args, preprocess)
    assert zero_shot.texts == ["golden retriever", "tabby cat"]  # not ImageNet: the folder names
    assert len(zero_shot.templates) == 80 and zero_shot.templates[0]("cat") == "a bad photo of a cat."
    retrieval = eval_driver.retrieval_task(args, preprocess)
    assert retrieval.num_images == 3 and retrieval.caption_image.tolist() == [0, 0, 1, 1, 2, 2]
    results = eval_driver.evaluate(model, tokenizer, [zero_shot, retrieval], "tome:r=3", progress=False)
    assert results[0]["zero_shot"]["num_images"] == 3 and results[0]["retrieval"]["num_captions"] == 6
    assert type(model.visual) is VisionTransformer  # unpatched afterwards


def test_zero_shot_uses_open_clip_imagenet_names_and_templates(eval_driver):
    import open_clip

    synsets = [f"n{index:08d}" for index in range(1000)]
    assert eval_driver.class_names(synsets) == list(open_clip.IMAGENET_CLASSNAMES)
    assert eval_driver.class_names(["golden_retriever", "tabby_cat"]) == ["golden retriever", "tabby cat"]
    with pytest.raises(ValueError, match="1000 class folders"):
        eval_driver.class_names(["a", "b"], "imagenet")
    args = eval_driver.parse_args(["--tiny", "--templates", "simple"])
    assert eval_driver.templates(args) == list(open_clip.SIMPLE_IMAGENET_TEMPLATES)
    args = eval_driver.parse_args(["--tiny", "--template", "a photo of a {}."])
    assert eval_driver.templates(args) == ["a photo of a {}."]


def test_retrieval_metrics_by_hand(eval_driver):
    caption_image = torch.tensor([0, 0, 1, 2])
    similarity = torch.tensor([[0.1, 0.9, 0.5, 0.0],   # image 0: own caption 1 ranks first
                               [0.8, 0.0, 0.3, 0.1],   # image 1: own caption 2 ranks second
                               [0.0, 0.1, 0.2, 0.05]])  # image 2: own caption 3 ranks fourth
    metrics = eval_driver.retrieval_metrics(similarity, similarity, caption_image)
    assert metrics["image_to_text_r1"] == pytest.approx(1 / 3)
    # captions: 0 -> best image 1 (wrong), 1 -> image 0, 2 -> image 0 (wrong), 3 -> image 1 (wrong)
    assert metrics["text_to_image_r1"] == pytest.approx(1 / 4)
    assert metrics["image_to_text_agreement"] == 1.0


@pytest.mark.parametrize("name", ["mha", "mha_layerscale_avg", "custom_all", "attn_pool"])
def test_thresholds_batch_with_different_token_counts_equals_one_by_one(name):
    torch.manual_seed(6)
    batch = torch.randn(4, 3, 32, 32)
    model = tiny_clip(**VARIANTS[name])
    with torch.no_grad():
        want = model.encode_image(batch)
        tokred.apply(model, tokred.Thresholds())  # infinite thresholds: nothing changes
        assert torch.equal(model.encode_image(batch), want)
        tokred.apply(model, tokred.Thresholds(merge=0.3, prune=0.8))
        batched = model.encode_image(batch)
        counts = tokred.last_trace(model).layers[-1].tokens_per_image
        singles = torch.cat([model.encode_image(batch[i:i + 1]) for i in range(4)])
    assert counts is not None and len(set(counts)) > 1
    torch.testing.assert_close(singles, batched, atol=1e-5, rtol=1e-4)
