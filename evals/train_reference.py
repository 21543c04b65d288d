"""Train the embedded reference ViT on scikit-learn's handwritten digits (offline, CPU, seeded).

Writes to ``results/train_reference/`` (``--out``; the shipped model is only replaced by an
explicit ``--out assets``):
  reference_vit.safetensors  fp32 state dict
  reference_vit.json         model kwargs, normalisation, split, training settings, test accuracy
  digits_test.npz            the held-out split: raw 8x8 uint8 images (0..16) and labels

Usage: python evals/train_reference.py [--epochs 30] [--threads 1] [--out results/train_reference]
The preprocessing is tokred.reference.preprocess_digits, the same function the loaders use.

Determinism: seeds for torch, numpy and random, one explicit torch.Generator for the data order
and the augmentation, torch.use_deterministic_algorithms(True) and a fixed thread count (the
summation order of the CPU kernels depends on it). Two runs on the same machine with the same
releases of torch / timm / scikit-learn and the same --threads give the same bytes; another
CPU (other SIMD kernels), another torch release or another thread count gives a slightly
different model, within about 1 point of held-out top-1. digits_test.npz (the split) is always
the same bytes for the same scikit-learn data.
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

from tokred.reference import (CONFIG_FILE, DATA_FILE, IMAGE_SIZE, WEIGHTS_FILE, build_reference_model, digits_split,
                              digits_to_unit, normalise)

SEED = 0
SPLIT_SEED = 0
TEST_FRACTION = 0.2
MODEL_KWARGS = dict(img_size=IMAGE_SIZE, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=8,
                    num_heads=3, mlp_ratio=4, global_pool="token")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/train_reference"),
                   help="output folder (default: results/train_reference); --out assets replaces the shipped model")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=3.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--max-rotate", type=float, default=10.0, help="degrees")
    p.add_argument("--max-translate", type=float, default=0.1, help="fraction of the image side")
    p.add_argument("--max-scale", type=float, default=0.1, help="zoom in [1 - s, 1 + s]")
    p.add_argument("--max-shear", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; part of the recipe (summation order depends on it)")
    return p.parse_args(argv)


def random_affine(x: torch.Tensor, gen: torch.Generator, args) -> torch.Tensor:
    """Random small rotation, zoom, shear and translation of a batch in [0, 1] (background 0)."""
    n = x.shape[0]

    def uniform(limit):
        return (torch.rand(n, generator=gen) * 2 - 1) * limit

    angle = uniform(math.radians(args.max_rotate))
    scale = 1 + uniform(args.max_scale)
    shear = uniform(args.max_shear)
    tx, ty = uniform(2 * args.max_translate), uniform(2 * args.max_translate)  # grid coords span 2
    cos, sin = angle.cos() / scale, angle.sin() / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def accuracy(model, images, labels, batch_size=256) -> float:
    model.eval()
    correct = sum((model(images[i:i + batch_size]).argmax(-1) == labels[i:i + batch_size]).sum().item()
                  for i in range(0, len(images), batch_size))
    return correct / len(images)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    random.seed(SEED)
    torch.use_deterministic_algorithms(True)

    raw, labels, idx_train, idx_test = digits_split(TEST_FRACTION, SPLIT_SEED)

    train_unit = digits_to_unit(raw[idx_train])
    mean, std = train_unit.mean().item(), train_unit.std().item()
    y_train = torch.as_tensor(labels[idx_train])
    x_test = normalise(digits_to_unit(raw[idx_test]), mean, std)
    y_test = torch.as_tensor(labels[idx_test])

    model = build_reference_model({"model_kwargs": MODEL_KWARGS})
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n and "cls_token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n and "cls_token" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    steps_per_epoch = math.ceil(len(y_train) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)

    def lr_factor(step):  # linear warm-up, then cosine decay to 0
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    gen = torch.Generator().manual_seed(SEED)

    start = time.perf_counter()
    bar = tqdm(range(args.epochs), desc="training", unit="epoch", file=sys.stdout)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(y_train), generator=gen)
        total_loss = 0.0
        for i in range(0, len(order), args.batch_size):
            batch = order[i:i + args.batch_size]
            with torch.no_grad():
                x = normalise(random_affine(train_unit[batch], gen, args), mean, std)
            loss = F.cross_entropy(model(x), y_train[batch], label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(batch)
        postfix = {"loss": f"{total_loss / len(y_train):.4f}", "lr": f"{scheduler.get_last_lr()[0]:.2e}"}
        if (epoch + 1) % 5 == 0 or epoch + 1 == args.epochs:
            postfix["test_acc"] = f"{accuracy(model, x_test, y_test):.4f}"
        bar.set_postfix(postfix)
    train_seconds = time.perf_counter() - start

    model.eval()
    test_acc = accuracy(model, x_test, y_test)
    train_acc = accuracy(model, normalise(train_unit, mean, std), y_train)
    print(f"test top-1 {test_acc:.4f} ({len(y_test)} images), train top-1 {train_acc:.4f}, "
          f"training took {train_seconds:.0f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / WEIGHTS_FILE), metadata={"format": "pt"})
    np.savez_compressed(args.out / DATA_FILE, images=raw[idx_test], labels=labels[idx_test], indices=idx_test)
    import sklearn
    import timm

    config = {
        "model": "timm.models.vision_transformer.VisionTransformer",
        "model_kwargs": MODEL_KWARGS,
        "input_size": [1, IMAGE_SIZE, IMAGE_SIZE],
        "normalisation": {"mean": mean, "std": std, "computed_on": "train split, after /16 and upsampling"},
        "preprocessing": "raw 8x8 digits (0..16) / 16, bilinear upsampling (align_corners=False) to 32x32, "
                         "(x - mean) / std; tokred.reference.preprocess_digits",
        "dataset": {"name": "sklearn.datasets.load_digits", "num_images": int(len(labels)),
                    "split": "stratified train_test_split", "test_fraction": TEST_FRACTION,
                    "split_seed": SPLIT_SEED, "num_train": int(len(y_train)), "num_test": int(len(y_test))},
        "training": {
            "seed": SEED, "epochs": args.epochs, "batch_size": args.batch_size, "optimizer": "AdamW",
            "lr": args.lr, "weight_decay": args.weight_decay, "betas": [0.9, 0.999],
            "no_weight_decay": "biases, norm weights, pos_embed, cls_token",
            "schedule": "linear warm-up then cosine to 0, per step", "warmup_epochs": args.warmup_epochs,
            "label_smoothing": args.label_smoothing, "clip_grad_norm": args.clip_grad,
            "augmentation": {"random_affine": {"max_rotate_deg": args.max_rotate, "max_translate": args.max_translate,
                                               "max_scale": args.max_scale, "max_shear": args.max_shear}},
            "threads": args.threads, "train_seconds": round(train_seconds, 1),
            "torch": torch.__version__, "timm": timm.__version__, "sklearn": sklearn.__version__,
        },
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
    }
    (args.out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {args.out / WEIGHTS_FILE}, {args.out / CONFIG_FILE}, {args.out / DATA_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
