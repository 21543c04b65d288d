"""Accuracy versus prefill FLOPs of the vision-language reducers on the shipped digits VLM.

Runs the unreduced model and every reducer x budget on the test split of ``evals/vlm_data.py``
(greedy answers, the same scoring as ``evals/train_vlm.py``) and reports, per configuration and
question family: accuracy with a 95% Wilson interval (``describe``: per cell, the interval over
cells, which are not independent within an image, so it is too narrow there), agreement with the
unreduced model's answers, and the prefill FLOPs ratio (``tokred.flops`` of one prefill batch,
reduced / unreduced). Budgets are fractions of the 64 visual tokens; Pool uses the window that
gives the same count on the 8x8 grid (1x2, 2x2, 2x4, 4x4).

Usage: python evals/sweep_vlm.py [--per-family 2000] [--budgets 0.5 0.25 0.125 0.0625]
       [--reducers divprune divprune-keep-positions random pool dart fastv] [--out results/sweep_vlm]
Writes <out>/sweep_vlm.json and <out>/sweep_vlm.md.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import tokred
from tokred.reference import assets_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_vlm  # noqa: E402
import vlm_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
POOL_STRIDE = {0.5: "1;2", 0.25: "2", 0.125: "2;4", 0.0625: "4"}
SPECS = {
    "divprune": "divprune:keep={keep}",
    "divprune-keep-positions": "divprune:keep={keep}/positions=keep",
    "random": "random:keep={keep}/stage=projector",
    "pool": "pool:stride={stride}/stage=projector",
    "dart": "dart:keep={keep}/layer=2",
    "fastv": "fastv:keep={keep}/layer=2",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=assets_dir() / "digits_vlm")
    p.add_argument("--per-family", type=int, default=2000)
    p.add_argument("--families", nargs="+", default=list(vlm_data.FAMILIES))
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.125, 0.0625])
    p.add_argument("--reducers", nargs="+", default=list(SPECS), choices=list(SPECS))
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path("results/sweep_vlm"))
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def spec_of(name: str, keep: float) -> str:
    if name == "pool":
        if keep not in POOL_STRIDE:
            raise ValueError(f"pool has windows for budgets {sorted(POOL_STRIDE)}, not {keep}")
        return SPECS[name].format(stride=POOL_STRIDE[keep])
    return SPECS[name].format(keep=keep)


def run_config(model, data: dict, full: dict | None, batch_size: int) -> dict:
    """Answers and scores of the model as it is now patched, family by family."""
    out = {"families": {}, "answers": {}}
    for family, examples in data.items():
        answers = []
        for i in range(0, len(examples), batch_size):
            answers += train_vlm.answer(model, examples[i:i + batch_size])
        scores = [vlm_data.score(ex, a) for ex, a in zip(examples, answers)]
        if family == "describe":
            k, n = sum(s["cells_correct"] for s in scores), sum(s["cells"] for s in scores)
        else:
            k, n = sum(s["correct"] for s in scores), len(scores)
        row = {"n": len(examples), "accuracy": k / n, "ci95": wilson(k, n)}
        if family == "describe":
            row["exact_match"] = sum(s["correct"] for s in scores) / len(scores)
        if full is not None:
            mine = [vlm_data.parse(a) for a in answers]
            theirs = [vlm_data.parse(a) for a in full["answers"][family]]
            same = [m == t if family == "describe" else m[1] == t[1] for m, t in zip(mine, theirs)]
            row["agreement"] = sum(same) / len(same)
        out["families"][family] = row
        out["answers"][family] = answers
    return out


def markdown(rows: list[dict], families: list[str]) -> str:
    head = "| reducer | keep | visual tokens | prefill FLOPs ratio | " + " | ".join(families) + " | agreement |"
    lines = [head, "|" + "---|" * (5 + len(families))]
    for row in rows:
        cells = []
        for f in families:
            r = row["families"][f]
            cells.append(f"{100 * r['accuracy']:.1f} ({100 * r['ci95'][0]:.1f}-{100 * r['ci95'][1]:.1f})")
        agreement = [row["families"][f].get("agreement") for f in families]
        agree = "—" if agreement[0] is None else f"{100 * sum(agreement) / len(agreement):.1f}"
        lines.append(f"| {row['spec']} | {row['keep']:g} | {row['visual_tokens']} | {row['flops_ratio']:.3f} | "
                     + " | ".join(cells) + f" | {agree} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(args.checkpoint, local_files_only=True).eval()
    data = {f: list(vlm_data.examples("test", f, args.per_family)) for f in args.families}
    probe = train_vlm.generation_batch(data[args.families[0]][:8])
    configs = [("none", 1.0)] + [(spec_of(r, k), k) for r in args.reducers for k in args.budgets]
    rows, full = [], None
    start = time.perf_counter()
    for spec, keep in tqdm(configs, desc="sweep", unit="config", file=sys.stdout):
        reducers = tokred.parse_spec(spec)
        with tokred.applied(model, *reducers):
            result = run_config(model, data, full, args.batch_size)
            flops = tokred.flops(model, **probe).total
        if full is None:
            full, full_flops = result, flops
        rows.append({"spec": spec, "keep": keep, "visual_tokens": max(1, round(keep * train_vlm.NUM_VISUAL)),
                     "flops": flops, "flops_ratio": flops / full_flops, "families": result["families"]})
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": str(args.checkpoint), "split": "test", "per_family": args.per_family,
              "families": args.families, "seconds": round(time.perf_counter() - start, 1), "rows": rows}
    (args.out / "sweep_vlm.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(rows, args.families)
    (args.out / "sweep_vlm.md").write_text(table)
    print(table)
    print(f"wrote {args.out / 'sweep_vlm.json'} and {args.out / 'sweep_vlm.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
