"""Video inputs of LLaVA-OneVision (and the video-specific parts of Qwen2-VL) beyond the
parametrised adapter tests (tests/test_llava.py ``onevision_video``, tests/test_qwen2_vl.py
``videos``): the protected newline, images and videos in one prompt, samples with different
numbers of videos, the tower attention against the eager attention, FLOPs, refusals."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tokred
from helpers import (IMAGE_TOKEN, VIDEO_TOKEN, clustered, onevision_video_inputs, qwen_media_inputs, tiny_llava,
                     tiny_onevision, tiny_qwen2_vl)

PROMPTS = [([1, 2, 3], [4, 5, 6, 7, 8]), ([9], [10, 11])]
SUPPRESS = [IMAGE_TOKEN, VIDEO_TOKEN]


@pytest.fixture(scope="module")
def model():
    return tiny_onevision()


def mixed_inputs(model, prompts, frames=2, seed=0):
    """Per sample: text, one image (AnyRes, 2 crops), one video of ``frames`` frames, text."""
    generator = torch.Generator().manual_seed(seed)
    video = onevision_video_inputs(prompts, frames, seed=seed)
    pixel_values = torch.randn(len(prompts), 2, 3, 56, 56, generator=generator)
    image_sizes = torch.tensor([[56, 56]] * len(prompts))
    with torch.no_grad():
        counts = [f.shape[0] for f in model.model.get_image_features(pixel_values, image_sizes,
                                                                      return_dict=True).pooler_output]
    rows = [before + [IMAGE_TOKEN] * n + [VIDEO_TOKEN] * (16 * frames + 1) + after
            for (before, after), n in zip(prompts, counts)]
    width = max(len(r) for r in rows)
    return dict(input_ids=torch.tensor([[0] * (width - len(r)) + r for r in rows]),
                attention_mask=torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
                pixel_values=pixel_values, image_sizes=image_sizes,
                pixel_values_videos=video["pixel_values_videos"])


def greedy(model, inputs, steps=4):
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, suppress_tokens=SUPPRESS, pad_token_id=0)
    return out[:, inputs["input_ids"].shape[1]:]


class Recording(tokred.DivPrune):
    """DivPrune that records what the projector stage handed it."""

    def plan_images(self, features, layout):
        Recording.seen.append((features.shape, layout))
        return super().plan_images(features, layout)


@torch.no_grad()
def test_the_newline_after_a_video_is_protected(model):
    """Projector reducers see the 3 x 16 video tokens with their layout, never the newline; the
    newline's embedding reaches the language model right after the kept video tokens."""
    inputs = onevision_video_inputs(PROMPTS[:1], frames=3)
    entering = []
    hook = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: entering.append(kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True)
    Recording.seen = []
    try:
        with tokred.applied(model, Recording(keep=5)):
            model(**inputs)
    finally:
        hook.remove()
    assert Recording.seen == [(torch.Size([1, 48, 64]), tokred.signals.Layout(3, 4, 4))]
    hidden = entering[-1][0]
    assert hidden.shape[0] == 3 + 5 + 1 + 5
    torch.testing.assert_close(hidden[3 + 5], model.model.image_newline)  # right after the 5 kept tokens


BUDGET = tokred.Budget.fit("distortion", clustered(8, tokens=48, dim=64), mean_keep=0.5)


@pytest.mark.parametrize("reducer, span", [
    (tokred.FastV(keep=0.5, layer=2), 48), (tokred.FastV(keep=BUDGET, layer=2), 48),
    (tokred.DART(keep=0.5, layer=2), 48), (tokred.ATP(layers=(2,), thresholds=0.0), 48),
    (tokred.AdjacentMerge(keep=0.5, layer=2), 48), (tokred.HoliTomInner(keep=0.5, layer=2), 49)],
    ids=["FastV", "FastV-Budget", "DART", "ATP", "AdjacentMerge", "HoliTomInner"])
@torch.no_grad()
def test_only_holitoms_inner_stage_counts_the_newline_as_visual(model, monkeypatch, reducer, span):
    """The llm stage's visual tokens of a 3-frame video: its 48 frame tokens, plus the newline for
    HoliTomInner alone (the reference's span, specs/holitom.md section 2); the engine refuses any other
    reducer that would remove the newline (a text token to it)."""
    inputs = onevision_video_inputs(PROMPTS[:1], frames=3)
    seen, plan_sequence = [], type(reducer).plan_sequence
    monkeypatch.setattr(type(reducer), "plan_sequence",
                        lambda self, signal: seen.append(signal.visual.sum(dim=1).tolist()) or plan_sequence(self,
                                                                                                               signal))
    with tokred.applied(model, reducer):
        model(**inputs)
    assert seen == [[span]]


@pytest.mark.parametrize("family", ["onevision", "qwen2_vl"])
@pytest.mark.parametrize("reducer", [tokred.VisionZip(dominant=1.0, contextual=0.0),
                                     tokred.Pool(stride=1, stage="projector", temporal_stride=1)], ids=str)
@torch.no_grad()
def test_keeping_everything_is_the_unpatched_model(model, family, reducer):
    """The video reducers not covered by the parametrised identity tests (their keep-everything
    settings are not a keep=1.0), with the tower-attention wrapper installed for VisionZip."""
    if family == "qwen2_vl":
        model = tiny_qwen2_vl()
        inputs = qwen_media_inputs(PROMPTS, [[("image", [1, 4, 4]), ("video", [2, 4, 6])], [("video", [3, 4, 4])]])
    else:
        inputs = onevision_video_inputs(PROMPTS, frames=2)
    reference, reference_tokens = model(**inputs).logits, greedy(model, inputs)
    with tokred.applied(model, reducer):
        assert torch.equal(model(**inputs).logits, reference)
        assert torch.equal(greedy(model, inputs), reference_tokens)


@torch.no_grad()
def test_images_and_videos_in_one_prompt(model):
    inputs = mixed_inputs(model, PROMPTS)
    reference = model(**inputs).logits
    reference_tokens = greedy(model, inputs)
    with tokred.applied(model, tokred.DivPrune(keep=1.0)):
        assert torch.equal(model(**inputs).logits, reference)
        assert torch.equal(greedy(model, inputs), reference_tokens)
    Recording.seen = []
    with tokred.applied(model, Recording(keep=0.5), tokred.FastV(keep=0.5, layer=2)):
        batch_tokens = greedy(model, inputs)
        layouts = {layout for _, layout in Recording.seen}
        assert tokred.signals.Layout(2, 4, 4) in layouts and None in layouts  # the video, the AnyRes image
        for i in range(2):
            single = mixed_inputs(model, [PROMPTS[i]])
            single.update(pixel_values=inputs["pixel_values"][i:i + 1],
                          pixel_values_videos=inputs["pixel_values_videos"][i:i + 1])
            assert torch.equal(greedy(model, single), batch_tokens[i:i + 1])


@pytest.mark.parametrize("reducer", [tokred.DivPrune(keep=0.25), tokred.VisionZip(dominant=3, contextual=1),
                                     tokred.DyCoke(keep=0.25, window=2)], ids=str)
@torch.no_grad()
def test_samples_with_different_numbers_of_videos(model, reducer):
    """Sample 0 holds two 2-frame videos, sample 1 one: the batch equals the samples run alone."""
    batch = onevision_video_inputs(PROMPTS, frames=2, seed=4, videos_per_sample=[2, 1])
    with tokred.applied(model, reducer):
        logits = model(**batch).logits[:, -1]
        tokens = greedy(model, batch)
        for i, videos in enumerate((slice(0, 2), slice(2, 3))):
            single = onevision_video_inputs([PROMPTS[i]], frames=2, videos_per_sample=[2 - i])
            single["pixel_values_videos"] = batch["pixel_values_videos"][videos]
            torch.testing.assert_close(model(**single).logits[:, -1], logits[i:i + 1], atol=1e-5, rtol=1e-5)
            assert torch.equal(greedy(model, single), tokens[i:i + 1])


class RecordingVisionZip(tokred.VisionZip):
    def plan_images(self, features, layout, received=None):
        RecordingVisionZip.received = received
        return super().plan_images(features, layout, received=received)


@torch.no_grad()
def test_tower_attention_equals_the_eager_attention():
    """The attention VisionZip receives is the tower's last layer softmax attention (eager),
    averaged over heads and queries, pooled like the features; the tower itself stays on SDPA."""
    eager = tiny_onevision(attn="eager")
    inputs = onevision_video_inputs(PROMPTS, frames=2, seed=1)
    pixels = inputs["pixel_values_videos"].flatten(0, 1)
    attention = eager.model.vision_tower(pixels, output_attentions=True).attentions[-1]  # (B F, H, 49, 49)
    received = attention.mean(dim=(1, 2))  # over heads and query rows
    want = eager.model.apply_pooling(received[..., None])[..., 0].reshape(2, -1)
    model = tiny_onevision()
    with tokred.applied(model, RecordingVisionZip(dominant=3, contextual=1)):
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, suppress_tokens=SUPPRESS, pad_token_id=0)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    torch.testing.assert_close(RecordingVisionZip.received, want, atol=1e-6, rtol=1e-5)
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert "get_video_features" not in model.model.__dict__  # the wrapper is gone with the reducer


def counted(fn):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("reducers", [(), (tokred.DivPrune(keep=0.5),), (tokred.VisionZip(dominant=4, contextual=2),)],
                         ids=str)
def test_flops_match_the_flop_counter(model, reducers):
    """Every tower run (the image's, the video's), the recomputed tower attention, VisionZip's members x
    targets similarity and the language model."""
    visionzip = bool(reducers) and isinstance(reducers[0], tokred.VisionZip)
    inputs = onevision_video_inputs(PROMPTS, frames=2) if visionzip else mixed_inputs(model, PROMPTS)
    with torch.no_grad(), tokred.applied(model, *reducers):
        measured = counted(lambda: model(**inputs))
        report = tokred.flops(model)
    if visionzip:
        assert report.stages["projector"] > 0 and any(part == "tower_attention" for _, part, _ in report.layers)
    assert report.total == measured


def test_visionzip_needs_tower_attention_where_tokred_has_none():
    """Refused on LLaVA-1.5 (model untouched); on a OneVision (AnyRes) image at call time."""
    other = tiny_llava("llava")
    with pytest.raises(ValueError, match="tower's attention"):
        tokred.apply(other, tokred.VisionZip(dominant=2, contextual=1))
    assert "forward" not in other.__dict__
    model = tiny_onevision()
    inputs = mixed_inputs(model, PROMPTS[:1])
    with tokred.applied(model, tokred.VisionZip(dominant=2, contextual=1)):
        with pytest.raises(ValueError, match="gave none for this image"):
            model(**inputs)


@torch.no_grad()
def test_video_placeholders_that_do_not_match(model):
    inputs = onevision_video_inputs(PROMPTS, frames=2)
    short = dict(inputs, input_ids=inputs["input_ids"].clone())
    short["input_ids"][0, 5] = 7
    with tokred.applied(model, tokred.DivPrune(keep=0.5)):
        with pytest.raises(ValueError, match="video placeholder tokens"):
            model(**short)
        cache = model(**inputs, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="new images or videos"):
            model(**inputs, past_key_values=cache)


@torch.no_grad()
def test_qwen_video_layout_and_time_positions():
    """A Qwen2-VL video of 3 temporal patches is one item with layout (3, rows, cols); kept tokens
    keep their original (t, h, w) and the text after the video starts where it did unreduced."""
    model = tiny_qwen2_vl()
    inputs = qwen_media_inputs([([5, 6], [7, 8])], [[("video", [3, 4, 6])]])
    full, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                         video_grid_thw=inputs["video_grid_thw"])
    Recording.seen = []
    seen = []
    hook = model.model.language_model.rotary_emb.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    try:
        with tokred.applied(model, Recording(keep=4)):
            model(**inputs)
    finally:
        hook.remove()
    assert Recording.seen == [(torch.Size([1, 18, 64]), tokred.signals.Layout(3, 2, 3))]
    positions = seen[-1][:, 0]  # (3, kept length)
    video = (inputs["input_ids"][0] == 91).nonzero().squeeze(1)
    originals = {tuple(full[:, 0, i].tolist()) for i in video}
    assert all(tuple(positions[:, 3 + j].tolist()) in originals for j in range(4))
    assert torch.equal(positions[:, -3:], full[:, 0, -3:])  # vision end and the text after it


class RecordingQwenVisionZip(tokred.VisionZip):
    def plan_images(self, features, layout, received=None):
        RecordingQwenVisionZip.received.append(received)
        return super().plan_images(features, layout, received=received)


def brute_force_qwen_attention(model, inputs):
    """The last vision block's softmax attention written out with full matrices: per attention
    chunk, softmax(q k^T scale) from the block's own qkv (q, k and v rows) and rotary, averaged over
    heads and queries, then over each 2 x 2 merge unit, in raster order, split per item."""
    import sys

    visual = model.model.visual
    block = visual.blocks[-1]
    seen = []
    hook = block.register_forward_pre_hook(lambda m, a, kw: seen.append((a, kw)), with_kwargs=True)
    per_item = []
    try:
        for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            seen.clear()
            out = visual(inputs[pixels], grid_thw=inputs[grid])
            (args, kwargs), = seen
            hidden, bounds = args[0] if args else kwargs["hidden_states"], kwargs["cu_seqlens"].tolist()
            x = block.norm1(hidden)
            q, k, _ = block.attn.qkv(x).reshape(x.shape[0], 3, block.attn.num_heads, -1).unbind(1)
            rotate = sys.modules[type(visual).__module__].apply_rotary_pos_emb_vision
            q, k = rotate(q, k, *kwargs["position_embeddings"])
            received = torch.cat([torch.softmax(torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * block.attn.scaling,
                                                dim=-1).mean(dim=(0, 1)) for a, b in zip(bounds, bounds[1:])])
            units = received.view(-1, 4).mean(dim=-1)
            if hasattr(visual, "fullatt_block_indexes"):  # Qwen2.5-VL runs its blocks in window order
                from transformers.vision_utils import get_vision_window_index

                window, _ = get_vision_window_index(inputs[grid], spatial_merge_size=2, window_size=visual.window_size,
                                                    patch_size=visual.patch_size, kwargs={})
                units = units[torch.argsort(window)]
            per_item += list(units.split((inputs[grid].prod(dim=-1) // 4).tolist()))
            assert sum(len(u) for u in per_item[-len(inputs[grid]):]) == out.pooler_output.shape[0]
    finally:
        hook.remove()
    return per_item


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
@torch.no_grad()
def test_qwen_tower_attention_equals_the_full_softmax(kind):
    model = tiny_qwen2_vl(kind)
    inputs = qwen_media_inputs(PROMPTS, [[("image", [1, 8, 6]), ("video", [2, 4, 6])], [("video", [3, 4, 4])]])
    want = brute_force_qwen_attention(model, inputs)
    RecordingQwenVisionZip.received = []
    with tokred.applied(model, RecordingQwenVisionZip(dominant=2, contextual=1)):
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
        report = tokred.flops(model)
    got = [row for batch in RecordingQwenVisionZip.received for row in batch]  # one call per (tokens, layout) group
    assert sorted(len(g) for g in got) == sorted(len(w) for w in want)
    for w in want:
        assert any(g.shape == w.shape and torch.allclose(g, w, atol=1e-6, rtol=1e-5) for g in got)
    assert any(part == "tower_attention" for _, part, _ in report.layers)
    assert "get_image_features" not in model.model.__dict__


def test_qwen_visionzip_flops_match_the_flop_counter():
    """The Qwen encoder runs (image, video), the recomputed last-block attention, VisionZip's members x
    targets similarity (per frame: the image's 12 - 3 members, the 2 frames of 6 - 3, the 3 of 4 - 3,
    x 1 target x 64 channels) and the language model."""
    model = tiny_qwen2_vl()
    inputs = qwen_media_inputs(PROMPTS, [[("image", [1, 8, 6]), ("video", [2, 4, 6])], [("video", [3, 4, 4])]])
    with torch.no_grad(), tokred.applied(model, tokred.VisionZip(dominant=2, contextual=1)):
        measured = counted(lambda: model(**inputs))
        report = tokred.flops(model)
    assert report.total == measured
    assert tokred.VisionZip(dominant=2, contextual=1).overhead_flops(torch.zeros(1, 12, 64)) == 2 * 9 * 1 * 64
