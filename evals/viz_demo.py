"""Draw ToMe's merged regions on the sample photo: ``python evals/viz_demo.py [--pretrained]``.

Writes ``results/viz/sample_tome.png``: the input next to one panel per layer, each patch group
that one token covers filled with its mean colour.

By default the ViT-S/16 has RANDOM weights (nothing is downloaded), which only shows that the
pipeline runs: random keys make the merges meaningless. Pass ``--pretrained`` (downloads timm's
ImageNet weights) for the picture ToMe users know, where merges follow objects and background.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch
from PIL import Image
from torchvision.transforms.functional import normalize, pil_to_tensor

import tokred
from tokred import viz
from tokred.reference import assets_dir

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", action="store_true",
                        help="load timm's pretrained weights (needs a download); without it the weights are random")
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--image", type=Path, default=assets_dir() / "sample.jpg")
    parser.add_argument("--r", type=int, default=16, help="tokens ToMe merges per layer")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 5, 8, 11])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "viz" / "sample_tome.png")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=args.pretrained).eval()
    cfg = model.pretrained_cfg
    size = cfg.get("input_size", (3, 224, 224))[1:]
    image = Image.open(args.image).convert("RGB").resize(size[::-1], Image.BICUBIC)
    pixels = pil_to_tensor(image).float() / 255
    batch = normalize(pixels, cfg.get("mean", (0.5,) * 3), cfg.get("std", (0.5,) * 3))[None]

    tokred.apply(model, tokred.ToMe(r=args.r))
    with torch.no_grad():
        model(batch)
    trace = tokred.last_trace(model)
    viz.save_sources(args.out, pixels, trace, layers=args.layers)
    weights = "pretrained" if args.pretrained else "random (pass --pretrained for meaningful merges)"
    print(f"{args.model}, {weights} weights, ToMe r={args.r}: tokens {trace.tokens()}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
