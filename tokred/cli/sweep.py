"""``tokred sweep``: top-1 accuracy and agreement against FLOPs, per reducer family over its strengths.

Every family in :data:`SWEEPS` whose reducer is registered (:func:`tokred.list_reducers`) is run over
its list of specs (weakest first) on the embedded reference model and its held-out digits, or on
``--model``/``--data``. There is no timing: the x axis is the analytic FLOPs ratio (reduced / full,
:func:`tokred.flops`). Writes ``sweep.json``, ``sweep.csv``, ``sweep.md`` and ``sweep.png`` (one
curve per family; the unreduced model as a dashed line) to ``--out``; ``--readme`` also puts the
table and the plot into the README between ``<!-- sweep:start -->`` and ``<!-- sweep:end -->``.

With ``--model`` a Hugging Face VLM checkpoint folder, the sweep answers a question file instead and
reports accuracy per question family (95% interval), agreement with the unreduced model, and the
prefill FLOPs and time-to-first-token ratios (:mod:`tokred.cli.vlm_sweep`); the default settings are
DivPrune, Random, Pool, DART and FastV at ``--keeps`` of the visual tokens. The question file
(``--questions``; default: the folder's ``questions.jsonl``) is JSON Lines, one question per line,
paths relative to the file, e.g.
``{"image": "img/1.png", "question": "How many dogs?", "answer": "2", "family": "count"}``:
``image`` / ``images`` / ``frames`` (a clip), ``question`` (put in the processor's chat template) or
``prompt`` (as written, image tokens included), ``answer``, optional ``family`` and ``score``
(``exact``, ``last_word`` or ``words``: word by word, for long answers). Writes ``sweep_vlm.json``,
``sweep_vlm.md`` and ``sweep_vlm.png``; ``--readme`` fills ``<!-- sweep-vlm:start -->`` ..
``<!-- sweep-vlm:end -->``.
"""
from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

from tokred import Reducer, registry
from tokred.cli import bench, require, tables, vlm, vlm_sweep

#: The default sweep: reducer family -> specs (:func:`tokred.parse_spec`), weakest reduction first.
#: Edit the strengths here. A family runs only while its name is registered (:func:`tokred.list_reducers`).
SWEEPS: dict[str, list[str]] = {
    "tome": ["tome:r=1", "tome:r=2", "tome:r=3", "tome:r=4", "tome:r=5", "tome:r=6", "tome:r=7", "tome:r=8"],
    "pitome": ["pitome:keep=0.95", "pitome:keep=0.9", "pitome:keep=0.85", "pitome:keep=0.8",
               "pitome:keep=0.75", "pitome:keep=0.7", "pitome:keep=0.65", "pitome:keep=0.6"],
    "random": ["random:keep=0.9", "random:keep=0.8", "random:keep=0.7", "random:keep=0.6",
               "random:keep=0.5", "random:keep=0.4", "random:keep=0.3"],
    "pool": ["pool:stride=1;2", "pool:stride=2", "pool:stride=2;4", "pool:stride=4"],
}

#: FLOPs ratios the learned thresholds are calibrated to in the default sweep of the reference
#: model (on its training split, never on the held-out images the sweep evaluates)
CALIBRATION_TARGETS = (0.7, 0.5, 0.35)

JSON_NAME = "sweep.json"
CSV_NAME = "sweep.csv"
MARKDOWN_NAME = "sweep.md"
PLOT_NAME = "sweep.png"
README_START = "<!-- sweep:start -->"
README_END = "<!-- sweep:end -->"
README_IMAGE = "docs/sweep.png"
CSV_COLUMNS = ["family", "spec", "tokens_final", "gflops_per_image", "flops_ratio", "top1", "agreement"]


# which settings ----------------------------------------------------------------------------
def available_families() -> list[str]:
    """The families of :data:`SWEEPS` whose reducer is registered now."""
    registered = registry.list_reducers()
    return [name for name in SWEEPS if name in registered]


def family_of(spec: str) -> str:
    """The reducer names of a spec: ``tome:r=4`` -> ``tome``, ``tome:r=4+pool:stride=2`` -> ``tome+pool``."""
    return "+".join(part.partition(":")[0].strip().lower() for part in spec.split("+"))


def sweep_settings(families: list[str] | None = None,
                   specs: str | None = None) -> list[tuple[str, str, tuple[Reducer, ...]]]:
    """[(family, label, reducers)] from explicit comma-separated ``specs`` or from :data:`SWEEPS`.

    ``none`` entries are dropped (the unreduced model is always measured, as the reference).
    ``families=None`` means every available family.
    """
    if specs is not None:
        if families is not None:
            raise ValueError("give either --reducers (families of the default sweep) or --specs, not both")
        parsed = bench.parse_reducers(specs)
        return [(family_of(label), label, reducers) for label, reducers in parsed if reducers]
    automatic = families is None
    if automatic:
        families = available_families()
    settings = []
    for family in families:
        if family not in SWEEPS:
            raise ValueError(f"no default sweep for '{family}'; families with one: {', '.join(SWEEPS)} "
                             "(use --specs for anything else)")
        if family not in registry.list_reducers():
            raise ValueError(f"'{family}' has a default sweep but is not a registered reducer yet; "
                             f"registered: {', '.join(registry.list_reducers())}")
        try:
            parsed = bench.parse_reducers(",".join(SWEEPS[family]))
        except ValueError as error:
            if not automatic:
                raise ValueError(f"the default sweep of '{family}' (tokred.cli.sweep.SWEEPS) does not parse: {error}") from None
            # A newly registered reducer whose spec list in SWEEPS does not match its parameters
            # must not break the default sweep of the others; say so loudly instead.
            print(f"warning: skipped the '{family}' family: its specs in tokred.cli.sweep.SWEEPS do not parse "
                  f"({error})", file=sys.stderr)
            continue
        settings.extend((family, label, reducers) for label, reducers in parsed)
    if not settings:
        raise ValueError("nothing to sweep")
    return settings


def calibrated_settings(model, targets, progress: bool = True) -> list[tuple[str, str, tuple[Reducer, ...]]]:
    """[("thresholds", label, (reducer,))]: :class:`~tokred.Thresholds` calibrated to each FLOPs target
    on the reference model's training split (one epoch, batches of 64 in a seeded order)."""
    import copy

    import torch

    import tokred
    from tokred.reference import load_reference_train_data

    images, labels = load_reference_train_data()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    batches = [(images[index], labels[index]) for index in order.split(64)]
    settings = []
    for target in targets:
        student = tokred.remove(copy.deepcopy(model))
        tokred.calibrate(student, batches, target_flops=target, progress=progress)
        settings.append(("thresholds", f"thresholds:calibrated={target}", tokred.reducers_of(student)))
    return settings


def _parse_families(text: str) -> list[str]:
    families = [name.strip().lower() for name in text.split(",")]
    if not all(families):
        raise ValueError(f"empty family name in --reducers '{text}'; expected e.g. tome,pitome")
    if len(set(families)) != len(families):
        raise ValueError(f"a family is listed twice in --reducers '{text}'")
    return families


# measuring ---------------------------------------------------------------------------------
def run_sweep(model, batches, settings: list[tuple[str, str, tuple[Reducer, ...]]], device="cpu",
              num_batches: int | None = None, progress: bool = True) -> dict:
    """Evaluate every setting (one shared copy of ``model``) and the unreduced model; no timing.

    Returns ``{"full": row, "results": [rows], "num_images", "has_labels"}``; the first result
    row is the unreduced model (family and spec ``none``); each row has family, spec,
    tokens_final, tokens_per_layer, gflops_per_image, flops_ratio, top1, agreement, notes.
    """
    evaluation = bench.evaluate(model, batches, [(label, reducers) for _, label, reducers in settings],
                                device=device, num_batches=num_batches, progress=progress, shared_model=True)

    def row(family: str, summary: dict) -> dict:
        return {"family": family, "spec": summary["reducer"], **{k: v for k, v in summary.items() if k != "reducer"}}

    full = row("none", {**bench.accuracy_summary(evaluation.full, evaluation.full, evaluation.has_labels),
                        "reducer": "none"})
    results = [full] + [row(family, summary) for (family, _, _), summary in zip(settings, evaluation.summaries())]
    return {"full": full, "results": results, "num_images": evaluation.full.images,
            "has_labels": evaluation.has_labels}


# output ------------------------------------------------------------------------------------
def format_markdown(report: dict) -> str:
    """The results as a Markdown table, one row per setting, the unreduced model first."""
    rows = [[row["family"], f"`{row['spec']}`", f"{row['tokens_final']:g}", f"{row['gflops_per_image']:.4f}",
             f"{row['flops_ratio']:.3f}", tables.percent(row["top1"]), tables.percent(row["agreement"])]
            for row in report["results"]]
    return tables.markdown(rows, ["family", "spec", "tokens after last block", "GFLOPs/img", "FLOPs ratio", "top-1",
                                  "agreement"], align="llrrrrr")


def write_csv(report: dict, path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for row in report["results"]:
            writer.writerow(["" if row[key] is None else row[key] for key in CSV_COLUMNS])


def plot(report: dict, path: Path) -> None:
    """Top-1 (left) and agreement (right) against FLOPs ratio, one curve per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = report["full"]
    families = list(dict.fromkeys(row["family"] for row in report["results"] if row["family"] != "none"))
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    panels = [("top1", "top-1 accuracy (%)"), ("agreement", "agreement with the full model (%)")]
    for ax, (key, name) in zip(axes, panels):
        if key == "top1" and not report["has_labels"]:
            ax.text(0.5, 0.5, "no labels: top-1 n/a", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        reference = 100 * full[key]
        ax.axhline(reference, color="black", linestyle="--", linewidth=1,
                   label=f"unreduced ({reference:.2f}%)")
        for k, family in enumerate(families):
            rows = sorted((row for row in report["results"] if row["family"] == family),
                          key=lambda row: row["flops_ratio"])
            ax.plot([row["flops_ratio"] for row in rows], [100 * row[key] for row in rows], "o-",
                    color=colours(k % 10), markersize=4, linewidth=1.5, label=family)
        ax.set_xlabel("FLOPs ratio (reduced / full)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{report['settings']['model']} on {report['settings']['data']} "
                 f"({report['num_images']} images): FLOPs vs accuracy", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def update_readme(readme: Path, markdown: str, image: str | None = README_IMAGE, markers=(README_START, README_END),
                  alt: str = "FLOPs ratio versus top-1 and agreement per reducer family") -> None:
    """Replace what lies between the two ``markers`` in ``readme`` with ``markdown`` and a link to
    ``image`` (none when None)."""
    start_marker, end_marker = markers
    text = readme.read_text()
    if text.count(start_marker) != 1 or text.count(end_marker) != 1:
        raise ValueError(f"{readme} must contain the markers {start_marker} and {end_marker} exactly once each")
    start, end = text.index(start_marker), text.index(end_marker)
    if end < start:
        raise ValueError(f"in {readme}, {end_marker} comes before {start_marker}")
    head, tail = text[:start], text[end + len(end_marker):]
    link = "" if image is None else f"\n![{alt}]({image})\n"
    block = f"{start_marker}\n{markdown}\n{link}{end_marker}"
    readme.write_text(head + block + tail)


def publish(readme: Path, markdown: str, plot_path: Path, image: str = README_IMAGE,
            markers=(README_START, README_END), alt: str = "FLOPs ratio versus top-1 and agreement per reducer family") -> None:
    """Copy the plot to ``image`` (relative to the README's folder) and put ``markdown`` with a link to
    it between the ``markers`` of ``readme`` (:func:`update_readme`)."""
    target = readme.parent / image
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(plot_path, target)
    update_readme(readme, markdown, image=image, markers=markers, alt=alt)
    print(f"updated {readme} and {target}")


# command line ------------------------------------------------------------------------------
def vlm_settings(args, config) -> list[tuple[str, str, float | None]]:
    """[(family, spec, keep)] of a VLM sweep: ``--specs`` as given, or the default sweep at ``--keeps``."""
    if args.max_new_tokens < 1 or args.rounds < 1:
        raise ValueError(f"--max-new-tokens and --rounds must be >= 1, got {args.max_new_tokens}, {args.rounds}")
    if args.specs is not None:
        if args.reducers is not None:
            raise ValueError("give either --reducers (families of the default VLM sweep) or --specs, not both")
        return [(family_of(label), label, None) for label, reducers in bench.parse_reducers(args.specs) if reducers]
    try:
        keeps = [float(k) for k in args.keeps.split(",")]
    except ValueError:
        raise ValueError(f"--keeps takes comma-separated fractions, e.g. 0.5,0.25; got {args.keeps!r}") from None
    if not all(0 < k <= 1 for k in keeps):
        raise ValueError(f"--keeps must lie in (0, 1], got {keeps}")
    names = None if args.reducers is None else [n.strip() for n in args.reducers.split(",")]
    return vlm_sweep.default_settings(keeps, names, vlm_sweep.tower_shape(config))


def add_arguments(parser) -> None:
    bench.add_model_arguments(parser, checkpoints=True,
                              limit="maximum number of images; for a VLM checkpoint, questions per question family "
                                    "(the first ones of each family in the question file)")
    parser.add_argument("--reducers", default=None,
                        help=f"comma-separated families of the default sweep (default: every registered one "
                             f"of {', '.join(SWEEPS)}; for a VLM checkpoint {', '.join(vlm_sweep.VLM_SWEEPS)} at the "
                             f"keeps --keeps); their specs are tokred.cli.sweep.SWEEPS / tokred.cli.vlm_sweep.VLM_SWEEPS")
    parser.add_argument("--specs", default=None,
                        help="explicit comma-separated reducer specs instead, e.g. 'tome:r=2,tome:r=6,pitome:keep=0.8'")
    parser.add_argument("--out", type=Path, default=Path("results/sweep"), help="output directory")
    parser.add_argument("--readme", type=Path, nargs="?", const=Path("README.md"), default=None,
                        help="also rewrite the README section between the sweep markers (default file: "
                             f"./README.md) and copy the plot to {README_IMAGE} next to it")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    vlm_options = parser.add_argument_group("VLM checkpoints (--model DIR)")
    vlm_options.add_argument("--questions", type=Path, default=None,
                             help="JSON Lines question file (format: see above; default: the checkpoint's "
                                  "questions.jsonl)")
    vlm_options.add_argument("--keeps", default=",".join(map(str, vlm_sweep.KEEPS)),
                             help="comma-separated fractions of the visual tokens the default VLM sweep keeps")
    vlm_options.add_argument("--max-new-tokens", type=int, default=32, help="greedy answer length limit")
    vlm_options.add_argument("--rounds", type=int, default=5, help="interleaved prefill timing rounds")
    parser.add_argument("--no-calibration", action="store_true",
                        help="skip the learned thresholds, which the default sweep of the reference model "
                             f"calibrates to FLOPs ratios {', '.join(map(str, CALIBRATION_TARGETS))} on its "
                             "training split (needs scikit-learn)")


def main(args) -> int:
    bench.check_model_arguments(args)
    if vlm.is_checkpoint(args.model):
        return vlm_sweep.main(args, vlm_settings)
    if args.questions is not None:
        raise ValueError("--questions is for a VLM checkpoint folder as --model")
    families = None if args.reducers is None else _parse_families(args.reducers)
    settings = sweep_settings(families, args.specs)
    if args.readme is not None and not args.readme.is_file():
        raise FileNotFoundError(f"README {args.readme} not found (pass --readme PATH)")
    if families is None and args.specs is None:
        missing = [name for name in SWEEPS if name not in registry.list_reducers()]
        if missing:
            print(f"note: not registered (yet), skipped: {', '.join(missing)}")
    calibrate = args.model is None and args.specs is None and families is None and not args.no_calibration
    if calibrate:
        require("sklearn", "the default sweep calibrates learned thresholds on the reference model's training "
                           "split; or pass --no-calibration")
    model, batches, num_batches, described, notes = bench.load_model_and_data(args)
    for note in notes:
        print(f"note: {note}")
    if calibrate:
        settings += calibrated_settings(model, CALIBRATION_TARGETS, progress=not args.no_progress)
    report = run_sweep(model, batches, settings, device=args.device, num_batches=num_batches,
                       progress=not args.no_progress)
    report["settings"] = {**described, "pretrained": args.pretrained, "limit": args.limit,
                          "batch_size": args.batch_size, "device": str(args.device),
                          "families": list(dict.fromkeys(family for family, _, _ in settings)),
                          "specs": [label for _, label, _ in settings], "notes": notes}
    report["versions"] = bench.versions()

    markdown = format_markdown(report)
    header = (f"{described['model']} on {described['data']}: {report['num_images']} images; "
              "FLOPs ratio = analytic FLOPs reduced / full (no timing)")
    print()
    print(header)
    print(markdown)
    noted = [row["spec"] for row in report["results"] if row["notes"]]
    if noted:
        print(f"notes (e.g. capped requests) for {', '.join(noted)}: see {args.out / JSON_NAME}")
    args.out.mkdir(parents=True, exist_ok=True)
    paths = {name: args.out / name for name in (JSON_NAME, CSV_NAME, MARKDOWN_NAME, PLOT_NAME)}
    paths[JSON_NAME].write_text(json.dumps(report, indent=2) + "\n")
    write_csv(report, paths[CSV_NAME])
    paths[MARKDOWN_NAME].write_text(f"{header}\n\n{markdown}\n")
    plot(report, paths[PLOT_NAME])
    print(f"wrote {', '.join(str(path) for path in paths.values())}")
    if args.readme is not None:
        publish(args.readme, markdown, paths[PLOT_NAME])
    return 0
