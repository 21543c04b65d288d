"""Train the digits VLM that ships with tokred: a real Hugging Face LLaVA checkpoint (offline, CPU, seeded).

The model is a ``LlavaForConditionalGeneration`` (LLaVA-1.5 layout: one 96x96 image, 64 visual
tokens, no AnyRes crops): a CLIP vision tower (dim 128, 4 layers, 12-px patches, 8x8 patch grid),
LLaVA's two-layer MLP projector and a Qwen2 language model (dim 128, 4 layers, 4 heads / 2 KV
heads) with a word-level tokenizer built with ``tokenizers``. It is saved with its processor, so
``AutoModelForImageTextToText.from_pretrained(dir)`` and ``AutoProcessor.from_pretrained(dir)``
load it with no network. The data are the digit scenes of ``evals/vlm_data.py``.

Training runs in stages (a loss on short answers alone stays at chance; dense targets train the reading):
  1. tower: the vision tower and projector learn per-cell digit labels (a linear head on each
     cell's 2x2 projected tokens, 10 digits + empty; the head is thrown away);
  2. describe: the whole model learns to write the description (16 cells in raster order);
  3. questions: every family, each target = the description, ``;``, then the answer, so a question
     becomes a lookup over 16 text tokens; the answer words weigh ``--answer-weight`` in the loss.
After each stage the model is measured on the validation split and saved (``stage<k>/``); during
stage 3, ``stage3/`` also holds the latest snapshot (every ``--save-every`` steps, with a 50-question
validation probe in the log). ``--stop-after N`` ends stage 3 after N steps with the same weights as
the step-N snapshot of the full schedule (checked bit for bit on a short run).

The shipped ``assets/digits_vlm`` is the step-2000 snapshot of the default schedule (600, 600,
3600 steps; 56 minutes on one thread of a busy 2-core CPU): description 97.7% per cell on the
test split, the question families 28-50% (see assets/digits_vlm/README.md). Both shipped checkpoints
reproduce byte for byte with the same torch / transformers releases and ``--threads`` (rerun 2026-11-30).

``--video`` trains the video model instead: a ``LlavaOnevisionForConditionalGeneration`` with the
same tower, projector and language model (OneVision pools each frame's 8x8 tokens to 4x4, one token
per cell: 8 frames x 16 + 1 newline = 129 visual tokens), on the clips of ``vlm_data`` (families
``frames``, ``last``, ``moved``, ``distinct``; the dense ``frames`` description plays the part of
``describe``; stage 1's head reads one pooled token per cell). ``--init assets/digits_vlm`` starts it
from the shipped image model (the vocabulary grows by ``<video>`` and the clips' words, appended so the
shared ids stay), ``--freeze-tower`` keeps the tower as stage 1 left it (half the step time). The shipped
``assets/digits_vlm_video`` is ``--video --init assets/digits_vlm --freeze-tower --steps 100 250 500
--batch-size 16 --val-per-family 50`` (46 minutes on one thread of a busy 2-core CPU): ``frames`` 97.7% per
cell, 76.7% of the digit cells; the temporal families 26-56% (see assets/digits_vlm_video/README.md).

Usage: python evals/train_vlm.py [--out results/train_vlm] [--steps 600 600 3600] [--threads 1]
Writes <out>/ (config.json, model.safetensors, processor and tokenizer files, training.json), and
<work>/train.log and <work>/stage1..3/ (default work and out: results/train_vlm/);
``--stop-after 2000 --out assets/digits_vlm --test-per-family 2000`` writes the shipped checkpoint.
``--evaluate DIR --test-per-family 2000`` scores an existing checkpoint (3 minutes).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vlm_data  # noqa: E402

SEED = 0
SPECIALS = ("<pad>", "<unk>", "<eos>", "<image>")
VOCAB = {w: i for i, w in enumerate(SPECIALS + vlm_data.WORDS)}
#: the video model's vocabulary: the image model's ids unchanged, ``<video>`` and the clips' words appended
VIDEO_VOCAB = {w: i for i, w in enumerate(SPECIALS + vlm_data.WORDS + ("<video>",) + vlm_data.VIDEO_WORDS)}
PAD, EOS, IMAGE, VIDEO = VOCAB["<pad>"], VOCAB["<eos>"], VOCAB["<image>"], VIDEO_VOCAB["<video>"]
PATCH = 12
NUM_VISUAL = (vlm_data.CANVAS // PATCH) ** 2          # 64
#: OneVision pools each frame's 8x8 patch grid to 4x4 (one token per cell) and appends one newline token
NUM_VIDEO = vlm_data.FRAMES * (vlm_data.CANVAS // PATCH // 2) ** 2 + 1   # 129
TOWER = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             image_size=vlm_data.CANVAS, patch_size=PATCH, num_channels=3)
TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
MAX_NEW_TOKENS = 24  # 16 cells + ";" + "a + b = s" + eos
MAX_NEW_TOKENS_VIDEO = vlm_data.FRAMES * vlm_data.GRID ** 2 + 3   # 128 cells + ";" + answer + eos


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help="where the final checkpoint goes (default: --work); e.g. assets/digits_vlm")
    p.add_argument("--work", type=Path, default=Path("results/train_vlm"),
                   help="log, stage checkpoints (stage1..3/) and, by default, the final checkpoint")
    p.add_argument("--steps", type=int, nargs=3, default=[600, 600, 3600], metavar=("TOWER", "DESCRIBE", "QUESTIONS"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, nargs=3, default=[1e-3, 1e-3, 1e-3])
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps of each stage")
    p.add_argument("--answer-weight", type=float, default=4.0, help="loss weight of the words after ';'")
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--val-per-family", type=int, default=100)
    p.add_argument("--test-per-family", type=int, default=0,
                   help="after training, score this many test questions per family (0: skip)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="end stage 3 after N of its steps (its learning-rate schedule still spans all of them)")
    p.add_argument("--save-every", type=int, default=500, help="stage-3 steps between saves of <out>/stage3")
    p.add_argument("--evaluate", type=Path, default=None, metavar="DIR",
                   help="no training: score the checkpoint in DIR on the test split (--test-per-family) and "
                        "the 200-question slice, and record both in DIR/training.json")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; part of the recipe (summation order depends on it)")
    p.add_argument("--video", action="store_true",
                   help="train the video model (LlavaOnevisionForConditionalGeneration) on the clips' families")
    p.add_argument("--freeze-tower", action="store_true",
                   help="stages 2 and 3 leave the vision tower as stage 1 made it (half the step time on clips)")
    p.add_argument("--init", type=Path, default=None, metavar="DIR",
                   help="start from the image checkpoint in DIR (tower, projector, language model; the video "
                        "vocabulary's new rows start random), e.g. assets/digits_vlm")
    return p.parse_args(argv)


# ---------------------------------------------------------------- model, tokenizer, processor

def build_model(video: bool = False):
    """The image model (LLaVA-1.5 layout) or, with ``video``, a LLaVA-OneVision model with the same
    tower, projector and language model (its anyres image path is configured, one 96x96 tile, but
    only video is trained)."""
    from transformers import (CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config)

    vocab = VIDEO_VOCAB if video else VOCAB
    text = Qwen2Config(vocab_size=len(vocab), pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, **TEXT)
    common = dict(vision_config=CLIPVisionConfig(**TOWER), text_config=text, image_token_id=IMAGE,
                  vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                  tie_word_embeddings=True)
    if video:
        side = vlm_data.CANVAS
        config = LlavaOnevisionConfig(**common, video_token_id=VIDEO, image_grid_pinpoints=[[side, side]],
                                      vision_aspect_ratio="anyres_max_1")
    else:
        config = LlavaConfig(**common, image_seq_length=NUM_VISUAL)
    config.pad_token_id, config.eos_token_id = PAD, EOS
    model = (LlavaOnevisionForConditionalGeneration if video else LlavaForConditionalGeneration)(config)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    model.generation_config.bos_token_id = None
    return model


def init_from(model, path: Path):
    """Copy the image checkpoint at ``path`` into ``model`` (tower, projector, language model; the
    embedding rows of words both vocabularies share, which have the same ids)."""
    from transformers import AutoModelForImageTextToText

    source = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    for name in ("vision_tower", "multi_modal_projector"):
        getattr(model.model, name).load_state_dict(getattr(source.model, name).state_dict())
    weights = source.model.language_model.state_dict()
    embed = weights.pop("embed_tokens.weight")
    target = model.model.language_model
    missing, unexpected = target.load_state_dict(weights, strict=False)
    if missing != ["embed_tokens.weight"] or unexpected:
        raise ValueError(f"{path} does not match the video model's language model: {missing}, {unexpected}")
    with torch.no_grad():
        target.embed_tokens.weight[:len(embed)] = embed


def build_processor(video: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                              LlavaOnevisionVideoProcessor, LlavaProcessor, PreTrainedTokenizerFast)

    specials = list(SPECIALS) + (["<video>"] if video else [])
    raw = Tokenizer(models.WordLevel(VIDEO_VOCAB if video else VOCAB, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<eos>", padding_side="left",
                                        model_max_length=TEXT["max_position_embeddings"])
    side = vlm_data.CANVAS
    scale = dict(do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3,
                 image_std=[0.5] * 3, do_convert_rgb=True)
    if video:
        frames = LlavaOnevisionVideoProcessor(do_resize=False, size={"height": side, "width": side}, **scale)
        images = LlavaOnevisionImageProcessor(size={"height": side, "width": side}, image_grid_pinpoints=[[side, side]],
                                              **scale)
        return LlavaOnevisionProcessor(image_processor=images, tokenizer=tokenizer, video_processor=frames,
                                       num_image_tokens=NUM_VISUAL, vision_feature_select_strategy="default",
                                       image_token="<image>", video_token="<video>", vision_aspect_ratio="anyres_max_1")
    images = CLIPImageProcessor(do_resize=False, do_center_crop=False, size={"shortest_edge": side},
                                crop_size={"height": side, "width": side}, **scale)
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>")


def pixel_values(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (..., 96, 96) grey scenes or clips -> (..., 3, 96, 96) as the processor gives them: x / 255,
    then (x - 0.5) / 0.5."""
    x = torch.from_numpy(np.stack(images)).float().mul_(1 / 255).sub_(0.5).div_(0.5)
    return x.unsqueeze(-3).expand(*x.shape[:-2], 3, *x.shape[-2:]).contiguous()


def visual_inputs(batch) -> dict:
    """The pixel input of a batch of scenes (``pixel_values``) or clips (``pixel_values_videos``)."""
    if isinstance(batch[0], vlm_data.Clip):
        return {"pixel_values_videos": pixel_values([ex.frames for ex in batch])}
    return {"pixel_values": pixel_values([ex.image for ex in batch])}


def encode_words(text: str) -> list[int]:
    return [VIDEO_VOCAB[w] for w in text.split()]


def prompt_ids(ex) -> list[int]:
    visual = [VIDEO] * NUM_VIDEO if isinstance(ex, vlm_data.Clip) else [IMAGE] * NUM_VISUAL
    return visual + encode_words(ex.question) + [VOCAB["?"]]


def training_batch(batch, answer_weight: float):
    """Right-padded teacher-forcing batch: ids, mask, per-position targets and loss weights."""
    rows, weights = [], []
    for ex in batch:
        prompt = prompt_ids(ex)
        target = encode_words(ex.target) + [EOS]
        cut = target.index(VOCAB[";"])
        rows.append((prompt, target))
        weights.append([1.0] * (cut + 1) + [answer_weight] * (len(target) - cut - 1))
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(batch), width), PAD)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100)
    weight = torch.zeros((len(batch), width))
    for i, ((prompt, target), w) in enumerate(zip(rows, weights)):
        seq = prompt + target
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        # position j predicts token j + 1: the last prompt position predicts the first target word
        labels[i, len(prompt) - 1:len(seq) - 1] = torch.tensor(target)
        weight[i, len(prompt) - 1:len(seq) - 1] = torch.tensor(w)
    inputs = dict(input_ids=ids, attention_mask=mask, **visual_inputs(batch))
    return inputs, labels, weight


def generation_batch(batch):
    """Left-padded prompts for ``generate``."""
    rows = [prompt_ids(ex) for ex in batch]
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return dict(input_ids=ids, attention_mask=mask, **visual_inputs(batch))


INVERSE = {i: w for w, i in VIDEO_VOCAB.items()}


@torch.no_grad()
def answer(model, batch) -> list[str]:
    """Greedy answers (the generated target text) for a batch of examples."""
    inputs = generation_batch(batch)
    limit = MAX_NEW_TOKENS_VIDEO if isinstance(batch[0], vlm_data.Clip) else MAX_NEW_TOKENS
    out = model.generate(**inputs, max_new_tokens=limit, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [" ".join(INVERSE[int(t)] for t in row if int(t) not in (PAD, EOS)) for row in new]


def evaluate(model, split: str, per_family, batch_size: int = 100, families=vlm_data.FAMILIES,
             progress: bool = False) -> dict:
    """Accuracy per family on the first ``per_family`` questions (an int, or a dict by family) of
    ``split``; ``describe`` and ``frames`` are measured per cell (``accuracy``) and per whole
    description (``exact_match``)."""
    model.eval()
    results = {}
    for family in families:
        n = per_family[family] if isinstance(per_family, dict) else per_family
        correct, counts = 0, dict.fromkeys(("cells_correct", "cells", "digits_correct", "digits"), 0)
        items = range(0, n, batch_size)
        for start in tqdm(items, desc=f"{split}/{family}", disable=not progress, file=sys.stdout, leave=False):
            batch = list(vlm_data.examples(split, family, min(batch_size, n - start), start))
            for ex, text in zip(batch, answer(model, batch)):
                s = vlm_data.score(ex, text)
                correct += s["correct"]
                for key in counts:
                    counts[key] += s.get(key, 0)
        results[family] = {"n": n, "accuracy": correct / n}
        if family in vlm_data.DENSE:
            cells, cells_total = counts["cells_correct"], counts["cells"]
            results[family]["cell_accuracy"] = cells / cells_total
            results[family]["digit_cell_accuracy"] = counts["digits_correct"] / counts["digits"]
            results[family]["exact_match"] = correct / n
            results[family]["accuracy"] = cells / cells_total  # a description is measured per cell
    return results


def save(model, processor, out: Path, info: dict | None = None):
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if info is not None:
        (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


# ---------------------------------------------------------------- training

class CellHead(torch.nn.Module):
    """Stage 1's throwaway head: each cell's per x per projected visual tokens -> 11 classes (10 digits,
    empty). A scene has 2x2 tokens per cell; a clip's frame, pooled by OneVision, has one."""

    def __init__(self, dim: int, per: int):
        super().__init__()
        self.per = per
        self.linear = torch.nn.Linear(per * per * dim, 11)

    def forward(self, features):  # (N, (4 per)^2, D), tokens in raster order
        b, _, d = features.shape
        grid, per = vlm_data.GRID, self.per
        x = features.view(b, grid, per, grid, per, d).permute(0, 1, 3, 2, 4, 5)
        return self.linear(x.reshape(b, grid * grid, per * per * d))


def cell_features(model, batch):
    """Projected visual tokens, (N, tokens, D): one row per scene, or per frame of a clip (the
    video's trailing newline token dropped)."""
    inputs = visual_inputs(batch)
    if "pixel_values_videos" in inputs:
        features = model.model.get_video_features(**inputs, return_dict=True).pooler_output
        return features[:, :-1].reshape(len(batch) * vlm_data.FRAMES, vlm_data.GRID ** 2, -1)
    features = model.model.get_image_features(**inputs, return_dict=True).pooler_output
    return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features


def cell_labels(batch):
    grids = [g for ex in batch for g in (ex.grids if isinstance(ex, vlm_data.Clip) else (ex.grid,))]
    return torch.tensor([[10 if d < 0 else d for d in g] for g in grids])


def lr_schedule(optimizer, steps: int, warmup: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run_stage(stage: int, model, args, draw, log) -> list[dict]:
    steps, lr = args.steps[stage - 1], args.lr[stage - 1]
    head = CellHead(model.config.text_config.hidden_size, 1 if args.video else 2) if stage == 1 else None
    model.model.vision_tower.requires_grad_(stage == 1 or not args.freeze_tower)
    params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters()) \
        + list(head.parameters()) if stage == 1 else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    scheduler = lr_schedule(optimizer, steps, args.warmup)
    families = args.families[:1] if stage == 2 else args.families   # stage 2: the dense family
    history = []
    model.train()
    bar = tqdm(range(steps), desc=f"stage {stage}", unit="step", file=sys.stdout, mininterval=10)
    running = None
    for step in bar:
        batch = draw(families, args.batch_size)
        if stage == 1:
            logits = head(cell_features(model, batch))
            labels = cell_labels(batch)
            loss = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1))
            acc = (logits.argmax(-1) == labels).float().mean().item()
        else:
            inputs, labels, weight = training_batch(batch, args.answer_weight)
            logits = model(**inputs).logits
            per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).clamp(min=0),
                                        reduction="none")
            loss = (per_token * weight.reshape(-1)).sum() / weight.sum()
            hit = (logits.argmax(-1) == labels) & (labels >= 0)
            acc = (hit.sum() / (labels >= 0).sum()).item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
        optimizer.step()
        scheduler.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}", acc=f"{acc:.3f}", refresh=False)
        if (step + 1) % 50 == 0:
            history.append({"step": step + 1, "loss": round(running, 5), "token_acc": round(acc, 4)})
            log(f"stage {stage} step {step + 1}/{steps} loss {running:.4f} acc {acc:.3f}")
        if stage == 3 and args.save_every and (step + 1) % args.save_every == 0 and step + 1 < steps:
            save(model, args.processor, args.work / "stage3")
            probe = evaluate(model, "val", 50, families=args.families)
            history.append({"step": step + 1, "val50": {f: round(r["accuracy"], 3) for f, r in probe.items()}})
            history[-1]["val50"].update({f"{f}_digit_cells": round(r["digit_cell_accuracy"], 3)
                                         for f, r in probe.items() if f in vlm_data.DENSE})
            log(f"stage 3 step {step + 1} val (50 per family): {json.dumps(history[-1]['val50'])}")
            model.train()
        if stage == 3 and args.stop_after and step + 1 == args.stop_after:
            log(f"stage 3 stopped after step {step + 1} (--stop-after)")
            break
    model.eval()
    if stage == 1:
        with torch.no_grad():
            val = list(vlm_data.examples("val", args.families[0], 100 if args.video else 500))
            logits = head(cell_features(model, val))
            cell_acc = (logits.argmax(-1) == cell_labels(val)).float().mean().item()
        return history, {"val_cell_accuracy_head": cell_acc}
    return history, evaluate(model, "val", args.val_per_family, families=args.families)


def measure(model, info: dict, test_per_family: int, video: bool = False) -> dict:
    """Test-split accuracy (``test_per_family`` per family) and the CI slice's, into ``info``."""
    families, chosen = (vlm_data.VIDEO_FAMILIES, vlm_data.VIDEO_SLICE) if video else (vlm_data.FAMILIES, vlm_data.SLICE)
    if test_per_family:
        start = time.perf_counter()
        info["test"] = evaluate(model, "test", test_per_family, families=families, progress=True)
        info["test_seconds"] = round(time.perf_counter() - start, 1)
        print(f"test: {json.dumps(info['test'])}", flush=True)
    info["slice200"] = {f: r["accuracy"] for f, r in evaluate(model, "test", chosen, families=families).items()}
    print(f"slice200: {json.dumps(info['slice200'])}", flush=True)
    return info


def evaluate_checkpoint(path: Path, test_per_family: int) -> int:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).eval()
    record = path / "training.json"
    info = json.loads(record.read_text()) if record.exists() else {}
    video = model.config.model_type == "llava_onevision"
    record.write_text(json.dumps(measure(model, info, test_per_family, video), indent=2) + "\n")
    print(f"wrote {record}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out = args.out or args.work
    torch.set_num_threads(args.threads)
    if args.evaluate is not None:
        return evaluate_checkpoint(args.evaluate, args.test_per_family)
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    random.seed(SEED)
    torch.use_deterministic_algorithms(True)
    args.work.mkdir(parents=True, exist_ok=True)
    log_file = open(args.work / "train.log", "a")

    def log(message):
        log_file.write(f"{time.strftime('%H:%M:%S')} {message}\n")
        log_file.flush()

    args.families = vlm_data.VIDEO_FAMILIES if args.video else vlm_data.FAMILIES
    model = build_model(args.video)
    if args.init is not None:
        init_from(model, args.init)
    processor = build_processor(args.video)
    args.processor = processor
    rng = np.random.default_rng(SEED)
    counter = [0]

    def draw(families, n):  # the next n training examples, families drawn uniformly
        batch = []
        for _ in range(n):
            family = families[int(rng.integers(len(families)))]
            batch.append(vlm_data.get("train", family, counter[0]))
            counter[0] += 1
        return batch

    n_params = sum(p.numel() for p in model.parameters())
    log(f"start: {n_params} parameters, steps {args.steps}, batch {args.batch_size}")
    info = {"model": f"transformers.{type(model).__name__}", "parameters": n_params,
            "tower": TOWER, "text": TEXT, "visual_tokens": NUM_VIDEO if args.video else NUM_VISUAL,
            "vocab": len(model.get_input_embeddings().weight),
            "data": f"evals/vlm_data.py (scikit-learn load_digits {'clips' if args.video else 'scenes'})",
            "prompt": vlm_data.VIDEO_PROMPT if args.video else vlm_data.PROMPT,
            "init": str(args.init) if args.init else None,
            "training": {"seed": SEED, "threads": args.threads, "batch_size": args.batch_size, "steps": args.steps,
                         "lr": args.lr, "weight_decay": args.weight_decay, "warmup": args.warmup,
                         "answer_weight": args.answer_weight, "clip_grad": args.clip_grad,
                         "freeze_tower": args.freeze_tower,
                         "stop_after": args.stop_after,
                         "optimizer": "AdamW", "schedule": "per stage: linear warm-up, cosine to 0.1 x lr",
                         "torch": torch.__version__},
            "stages": []}
    total = 0.0
    for stage in (1, 2, 3):
        start = time.perf_counter()
        history, measured = run_stage(stage, model, args, draw, log)
        seconds = time.perf_counter() - start
        total += seconds
        done = args.steps[stage - 1] if stage < 3 or not args.stop_after else min(args.stop_after, args.steps[2])
        info["stages"].append({"stage": stage, "name": ("tower", args.families[0], "questions")[stage - 1],
                               "steps": done, "schedule_steps": args.steps[stage - 1], "seconds": round(seconds, 1),
                               "examples_seen": counter[0], "val": measured, "loss_history": history})
        log(f"stage {stage} done in {seconds:.0f} s: {json.dumps(measured)}")
        print(f"stage {stage} done in {seconds:.0f} s: {json.dumps(measured)}", flush=True)
        save(model, processor, args.work / f"stage{stage}", info)
    info["train_seconds"] = round(total, 1)
    measure(model, info, args.test_per_family, args.video)
    log(f"test: {json.dumps(info.get('test'))}, slice200: {json.dumps(info['slice200'])}")
    save(model, processor, args.out, info)
    log(f"saved {args.out}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
