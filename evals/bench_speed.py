"""Merging speed on CPU: throughput of ViT-B/16 with tokred's ToMe (and PiToMe) against the
unpatched model.

Random weights (speed does not depend on them). Every ratio is measured in this one process:
in each round the unpatched model and every reduced copy run the same batch one after the
other, in a rotating order, and the reported ratio is the median over rounds of
time(unpatched) / time(reduced). The FLOPs-predicted ratio comes from tokred's analytic count;
"of predicted" is measured / predicted. Each reducer's own overhead (matching or energy +
merging) is timed on its own, on random inputs of the token counts the forward had.

    python evals/bench_speed.py                      # both cases from the issue
    python evals/bench_speed.py --rounds 3 --only 224
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import timm
import torch
from tqdm import tqdm

import tokred
from tokred.cli import tables
from tokred.signals import Signal

CASES = {
    "224": dict(model="vit_base_patch16_224", size=224, batch=8,
                reducers=[tokred.ToMe(r=r) for r in (0, 8, 13, 16)] + [tokred.PiToMe(keep=0.9)]),
    "384": dict(model="vit_base_patch16_384", size=384, batch=4, reducers=[tokred.ToMe(r=0), tokred.ToMe(r=23)]),
}


def label(reducer) -> str:
    return f"ToMe r={reducer.r}" if isinstance(reducer, tokred.ToMe) else f"PiToMe keep={reducer.keep}"


def timed(model, images) -> float:
    start = time.perf_counter()
    model(images)
    return time.perf_counter() - start


def reducer_overhead(model, reducer, images, repeats: int = 5) -> float:
    """Seconds spent in the reducer's planning and the merge alone, for the token counts of one forward."""
    trace = tokred.last_trace(model)
    dim, head_dim, depth = model.embed_dim, model.blocks[0].attn.head_dim, len(model.blocks)
    inputs = []
    for record in trace.layers:
        if record.removed:
            keys = torch.randn(images.shape[0], record.tokens_in, head_dim)
            x = torch.randn(images.shape[0], record.tokens_in, dim)
            signal = Signal(x, keys, model.num_prefix_tokens, None)
            inputs.append((record.layer, signal, torch.ones(*x.shape[:2], 1)))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for layer, signal, size in inputs:
            reducer.plan(layer, depth, signal).weighted_mean(signal.tokens, size)
        best = min(best, time.perf_counter() - start)
    return best


def run_case(name: str, rounds: int) -> list[dict]:
    case = CASES[name]
    torch.manual_seed(0)
    full = timm.create_model(case["model"], pretrained=False).eval()
    images = torch.randn(case["batch"], 3, case["size"], case["size"])
    models = {"unpatched": full}
    for reducer in case["reducers"]:
        models[label(reducer)] = tokred.apply(copy.deepcopy(full), reducer)
    times: dict[str, list[float]] = {key: [] for key in models}
    with torch.inference_mode():
        full_flops = tokred.flops(full, images).total
        for model in models.values():
            model(images)  # warm-up
        names = list(models)
        for round_index in tqdm(range(rounds), desc=f"{case['model']} batch {case['batch']}"):
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            for key in order:
                times[key].append(timed(models[key], images))
        rows = []
        for reducer in case["reducers"]:
            key = label(reducer)
            model = models[key]
            model(images)
            flops = tokred.flops(model).total
            per_round = [f / t for f, t in zip(times["unpatched"], times[key])]
            measured = statistics.median(per_round)
            low, _, high = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else (measured,) * 3
            predicted = full_flops / flops
            overhead = reducer_overhead(model, reducer, images) / statistics.median(times[key])
            rows.append(dict(model=case["model"], image_size=case["size"], batch=case["batch"], reducer=key,
                             tokens_last_layer=tokred.last_trace(model).final_tokens,
                             gflops_per_image=flops / case["batch"] / 1e9,
                             throughput_ratio=measured, throughput_ratio_iqr=[low, high], flops_ratio=predicted,
                             of_predicted=measured / predicted, overhead_share=overhead,
                             unpatched_s=statistics.median(times["unpatched"]),
                             reduced_s=statistics.median(times[key])))
    return rows


def markdown(rows: list[dict]) -> str:
    cells = [[row["model"], row["image_size"], row["batch"], row["reducer"], row["tokens_last_layer"],
              f"{row['gflops_per_image']:.2f}", f"{row['flops_ratio']:.3f}x",
              f"{row['throughput_ratio']:.3f}x ({row['throughput_ratio_iqr'][0]:.2f}-{row['throughput_ratio_iqr'][1]:.2f})",
              f"{row['of_predicted']:.3f}", f"{100 * row['overhead_share']:.1f}%"] for row in rows]
    return tables.markdown(cells, ["model", "px", "batch", "reducer", "tokens after last block", "GFLOPs/img",
                                   "FLOPs-predicted speedup", "measured speedup (IQR)", "measured ÷ predicted",
                                   "reducer overhead share"], align="lrrlrrrrrr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--only", choices=sorted(CASES), action="append", help="run only this case")
    parser.add_argument("--out", type=Path, default=Path("results/speed.json"))
    args = parser.parse_args()
    rows = [row for name in (args.only or list(CASES)) for row in run_case(name, args.rounds)]
    print(markdown(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(rows=rows, torch=torch.__version__, timm=timm.__version__,
                                        threads=torch.get_num_threads()), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
