"""DToMe against ToMe at the same average token count on the embedded reference ViT (the digits).

For each r, ToMe(r) removes r tokens in every block of every image; DToMe is calibrated with
``tokred.calibrate_dtome(model, <512 training images in batches of 128>, r=r)`` so that the *average*
image removes about r per block, and each image keeps what its content allows. On the 360 held-out
digits the table gives, per setting: the tokens leaving the last block per image (mean ± std, as DyMU
reports them), the prefill FLOPs ratio of the images run one by one (no padding) and top-1.

Usage: python evals/dtome_vit.py [--r 1 2 3 4 5 6 7 8] [--readme]
(``--readme`` rewrites the README block between ``<!-- dtome-vit:start -->`` and ``<!-- dtome-vit:end -->``.)
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

import tokred
from tokred.cli import sweep, tables
from tokred.reference import load_reference_data, load_reference_model, load_reference_train_data

MARKERS = ("<!-- dtome-vit:start -->", "<!-- dtome-vit:end -->")


def measure(model, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1, tokens per image after the last block (mean, std) and GFLOPs per image, images run alone."""
    tokens, flops, correct = [], [], 0
    with torch.no_grad():
        for image, label in zip(images, labels):
            logits = model(image[None])
            correct += int(logits.argmax(dim=-1).item() == label.item())
            trace = tokred.last_trace(model)
            tokens.append(trace.final_tokens if trace is not None else None)
            flops.append(tokred.flops(model).total)
    return {"top1": correct / len(labels), "tokens": tokens, "gflops": statistics.mean(flops) / 1e9}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--r", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8])
    p.add_argument("--readme", type=Path, nargs="?", const=Path("README.md"), default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_reference_model()
    train, _ = load_reference_train_data()
    images, labels = load_reference_data()
    with tokred.applied(model, tokred.ToMe(r=0)):  # the tracing path, removing nothing: the token count
        full = measure(model, images, labels)
    rows = [["none", "—", f"{statistics.mean(full['tokens']):.1f} ± 0.0", "1.000", tables.percent(full["top1"])]]
    for r in args.r:
        dtome = tokred.calibrate_dtome(model, train[:512].split(128), r=r, progress=False)
        for name, reducer in (("ToMe", tokred.ToMe(r=r)), ("DToMe", dtome)):
            with tokred.applied(model, reducer):
                result = measure(model, images, labels)
            rows.append([name, r, f"{statistics.mean(result['tokens']):.1f} ± {statistics.pstdev(result['tokens']):.1f}",
                         f"{result['gflops'] / full['gflops']:.3f}", tables.percent(result["top1"])])
        print(f"r={r} done", file=sys.stderr)
    table = tables.markdown(rows, ["reducer", "r", "tokens after the last block (mean ± std)",
                                   "FLOPs ratio (per image)", "top-1"], align="lrrrr")
    print(table)
    if args.readme is not None:
        sweep.update_readme(args.readme, table, image=None, markers=MARKERS)
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
