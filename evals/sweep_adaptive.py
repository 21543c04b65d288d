"""The adaptive reducers against fixed ones at the same mean cost, on the shipped digits VLM.

Calibrates on the train split of ``evals/vlm_data.py`` (scenes only, no labels), then runs
``tokred sweep``'s :func:`tokred.cli.vlm_sweep.run` on the test split written as a question file by
``evals/sweep_vlm.py``'s ``export`` (greedy answers, accuracy per family with a 95% Wilson interval,
visual tokens per question as mean ± std, prefill FLOPs ratio of each image run alone). Rows:

- ToMe, ToMe + VTU, DToMe, DToMe + VTU at about 1/2 and 1/4 of the 64 visual tokens: ToMe with r
  per block (4 blocks), DToMe with ``tokred.calibrate_dtome`` thresholds for the same r, so both
  average 64 - 4r tokens, ToMe exactly and DToMe per image by content;
- DivPrune with a fixed keep against ``DivPrune(keep=Budget.fit("distortion", ...))`` at the same
  mean keep (a linear ramp and CAT-style tiers), both with kept positions (this model reads cells by
  their rotary positions, see the README's "Accuracy on the shipped VLM");
- ATP (``tokred.calibrate(reducer=ATP(layers=(1, 2, 3), strides=8))``) at two language-model FLOPs
  targets, against FastV and DART before layer 1 with the visual-token count whose per-image
  language-model prefill FLOPs on the calibration scenes come closest to ATP's;
- Matryoshka scales: 16, 4 and 1 of the 8x8 grid's tokens.

Usage: python evals/sweep_adaptive.py [--per-family 500] [--readme] [--out results/sweep_adaptive]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image

import tokred
from tokred.cli import bench, sweep, vlm
from tokred.cli import vlm_sweep as vs
from tokred.reference import assets_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sweep_vlm  # noqa: E402
import train_vlm  # noqa: E402
import vlm_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
README_START, README_END = "<!-- sweep-adaptive:start -->", "<!-- sweep-adaptive:end -->"
README_IMAGE = "docs/sweep_adaptive.png"
JSON_NAME, MARKDOWN_NAME, PLOT_NAME = "sweep_adaptive.json", "sweep_adaptive.md", "sweep_adaptive.png"
#: ToMe / DToMe tokens removed per block (4 blocks, 64 tokens): 64 - 4r = 32 (1/2), 16 (1/4)
MERGE_R = (8, 12)
#: DivPrune keep fractions, fixed and as a Budget's mean
BUDGET_KEEPS = (0.5, 0.25)
#: ATP's language-model prefill FLOPs targets (per image)
ATP_TARGETS = (0.6, 0.45)
ATP_LAYERS, ATP_STRIDE = (1, 2, 3), 8
#: train questions ATP is calibrated on (its KL loss needs prompts), and how many of them, spread over
#: the families, FastV's and DART's counts are matched to ATP's FLOPs on
ATP_CALIBRATION, MATCH_QUESTIONS = 96, 24
#: Matryoshka scales: square divisors of the 8x8 grid
MATRYOSHKA_TOKENS = (16, 4, 1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=assets_dir() / "digits_vlm")
    p.add_argument("--per-family", type=int, default=500, help="test questions per family")
    p.add_argument("--families", nargs="+", default=list(vlm_data.FAMILIES), choices=vlm_data.FAMILIES)
    p.add_argument("--calibration", type=int, default=512, help="train scenes the calibrations see")
    p.add_argument("--kinds", nargs="+", default=["merge", "budget", "atp", "matryoshka"],
                   choices=["merge", "budget", "atp", "matryoshka"], help="which groups of rows to run")
    p.add_argument("--questions-dir", type=Path, default=Path("results/digits_vlm_questions_adaptive"))
    p.add_argument("--out", type=Path, default=Path("results/sweep_adaptive"))
    p.add_argument("--readme", type=Path, nargs="?", const=REPO / "README.md", default=None,
                   help="rewrite the README's table between the sweep-adaptive markers and docs/sweep_adaptive.png")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--rounds", type=int, default=1, help="interleaved prefill timing rounds (TTFT ratio)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


# calibration (train split) -------------------------------------------------------------------------
def calibration_data(processor, count: int, batch: int = 16):
    """(pixels of ``count`` train scenes; processor batches of :data:`ATP_CALIBRATION` train questions,
    every family alike; :data:`MATCH_QUESTIONS` of those, spread over the families, for matching FLOPs)."""
    scenes = [Image.fromarray(ex.image).convert("RGB") for ex in vlm_data.examples("train", "describe", count)]
    pixels = processor.image_processor(scenes, return_tensors="pt")["pixel_values"]
    per_family = max(1, ATP_CALIBRATION // len(vlm_data.FAMILIES))
    questions = [vs.Question(answer=ex.answer, prompt=vlm_data.prompt(ex), images=(Image.fromarray(ex.image),),
                             family=family)
                 for family in vlm_data.FAMILIES for ex in vlm_data.examples("train", family, per_family)]
    inputs = [vs.model_inputs(processor, questions[i:i + batch]) for i in range(0, len(questions), batch)]
    return pixels, inputs, questions[::max(1, len(questions) // MATCH_QUESTIONS)][:MATCH_QUESTIONS]


def llm_flops(model, processor, questions, *reducers) -> float:
    """Mean language-model prefill FLOPs of ``questions``, each alone, under ``reducers``."""
    total = 0
    with tokred.applied(model, *reducers):
        for q in questions:
            total += tokred.flops(model, **vs.model_inputs(processor, [q])).stages["llm_prefill"]
    return total / len(questions)


def matched_keep(model, processor, questions, make, goal: float) -> tuple[int, float]:
    """(k, its FLOPs): the visual-token count whose ``make(k)`` language-model FLOPs per image come
    closest to ``goal`` (bisection: the FLOPs grow with k)."""
    low, high = 1, 64
    while low < high:   # the smallest k whose FLOPs reach the goal
        middle = (low + high) // 2
        if llm_flops(model, processor, questions, make(middle)) < goal:
            low = middle + 1
        else:
            high = middle
    costs = {k: llm_flops(model, processor, questions, make(k)) for k in {max(1, low - 1), low}}
    k = min(costs, key=lambda k: (abs(costs[k] - goal), k))
    return k, costs[k]


def settings(model, processor, kinds, calibration: int, progress: bool):
    """[(row label, spec label, keep, reducers)] of the adaptive sweep and {label: fitted reducer string}."""
    pixels, inputs, match_questions = calibration_data(processor, calibration)
    patches, blocks = vs.tower_shape(model.config)
    rows, fitted = [], {}

    def add(label, reducers, keep=None, spec=None):
        rows.append((label, spec or "+".join(map(str, reducers)), keep, tuple(reducers)))

    if "merge" in kinds:
        for r in MERGE_R:
            dtome = tokred.calibrate_dtome(model, pixels.split(128), r=r, progress=progress,
                                           forward=lambda m, x: m.model.get_image_features(pixel_values=x))
            thresholds = ";".join(f"{t:.4f}" for t in dtome.thresholds)
            fitted[f"dtome r={r}"] = str(dtome)
            keep = (patches - blocks * r) / patches
            add("ToMe", [tokred.ToMe(r=r)], keep)
            add("ToMe + VTU", [tokred.ToMe(r=r), tokred.VTU()], keep)
            add("DToMe", [dtome], keep, f"dtome:thresholds=({thresholds}) [r={r}]")
            add("DToMe + VTU", [dtome, tokred.VTU()], keep, f"dtome:thresholds=({thresholds}) [r={r}]+vtu")
    if "budget" in kinds:
        with torch.no_grad():
            features = torch.cat([torch.stack(model.model.get_image_features(pixel_values=b, return_dict=True)
                                              .pooler_output) for b in pixels.split(64)])
        for keep in BUDGET_KEEPS:
            add("DivPrune (fixed)", [tokred.DivPrune(keep=keep, positions="keep")], keep)
            ramp = tokred.Budget.fit("distortion", features, mean_keep=keep, eps=0.1)
            tiers = tokred.Budget.fit("distortion", features, mean_keep=keep, eps=0.1,
                                      buckets=(keep / 2, keep, min(1.0, 2 * keep)))
            for label, budget, shape in (("DivPrune (Budget, ramp)", ramp, "ramp"),
                                         ("DivPrune (Budget, tiers)", tiers, "tiers x0.5/x1/x2")):
                fitted[f"{label} {keep}"] = repr(budget)
                add(label, [tokred.DivPrune(keep=budget, positions="keep")], keep,
                    f"divprune:keep=Budget(distortion;eps=0.1;mean={keep};{shape})/positions=keep")
    if "atp" in kinds:
        full = llm_flops(model, processor, match_questions)
        for target in ATP_TARGETS:
            atp = tokred.calibrate(model, inputs, reducer=tokred.ATP(layers=ATP_LAYERS, strides=ATP_STRIDE),
                                   target_flops=target, progress=progress)
            tokred.remove(model)
            fitted[f"atp {target}"] = str(atp)
            goal = llm_flops(model, processor, match_questions, atp)
            thresholds = ";".join(f"{t:.3f}" for t in atp.thresholds)
            layers = ";".join(map(str, ATP_LAYERS))
            add("ATP", [atp], target, f"atp:layers=({layers})/thresholds=({thresholds})/strides={ATP_STRIDE}")
            for label, make in (("FastV", lambda k: tokred.FastV(keep=k, layer=1)),
                                ("DART", lambda k: tokred.DART(keep=k, layer=1))):
                k, cost = matched_keep(model, processor, match_questions, make, goal)
                fitted[f"{label} at ATP {target}"] = (f"{make(k)}: LM FLOPs ratio {cost / full:.3f}, "
                                                      f"ATP {goal / full:.3f}")
                add(label, [make(k)], target)
    if "matryoshka" in kinds:
        for tokens in MATRYOSHKA_TOKENS:
            add("Matryoshka", [tokred.Matryoshka(tokens=tokens)], tokens / patches)
    return rows, fitted


# command line --------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    model, processor = vlm.load(args.checkpoint)
    rows, fitted = settings(model, processor, args.kinds, args.calibration, not args.no_progress)
    calibrated = time.time() - start
    path = sweep_vlm.export(args.questions_dir, {f: args.per_family for f in args.families})
    questions = vs.read_questions(path)
    report = vs.run(model, processor, questions, rows, batch_size=args.batch_size,
                    max_new_tokens=train_vlm.MAX_NEW_TOKENS, rounds=args.rounds, progress=not args.no_progress)
    report["settings"] = {"model": str(args.checkpoint), "questions": str(path), "per_family": args.per_family,
                          "calibration_scenes": args.calibration, "batch_size": args.batch_size,
                          "threads": args.threads, "calibration_seconds": round(calibrated),
                          "seconds": round(time.time() - start)}
    report["fitted"] = fitted
    report["versions"] = bench.versions()
    header = (f"{args.checkpoint.name}: {len(questions)} test questions ({args.per_family} per family), "
              f"calibrated on {args.calibration} train scenes; visual tokens per question entering the language "
              f"model (→ at its last layer), mean ± std; FLOPs ratios: analytic prefill, reduced / full, of the "
              f"first batch and of each of {report['flops_sample']} questions run alone")
    markdown = vs.format_markdown(report)
    paths = vs.write_report(report, args.out, (JSON_NAME, MARKDOWN_NAME, PLOT_NAME), header, markdown,
                            f"{args.checkpoint.name}: adaptive vs fixed budgets ({len(questions)} questions)",
                            x="flops_ratio_per_image")
    print(f"the sweep took {time.time() - start:.0f} s")
    if args.readme is not None:
        sweep.publish(args.readme, markdown, paths[2], image=README_IMAGE, markers=(README_START, README_END),
                      alt="per-image prefill FLOPs ratio versus accuracy per question family, adaptive and "
                          "fixed reducers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
