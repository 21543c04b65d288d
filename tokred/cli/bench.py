"""``tokred bench``: FLOPs, measured speed and accuracy of reducers against the full model.

Every setting runs on deep copies of one model, in one process. For each setting the benchmark
records the tokens left after the last layer, analytic GFLOPs per image (:func:`tokred.flops`, 2 x
multiply-adds) and GMACs (multiply-adds), the FLOPs ratio and the measured speed ratio against the
unreduced model (by default the CPU time of one thread, so that other programs on a shared machine
do not count; warm-up rounds, then interleaved timing rounds on the same batch: median of the
per-round ratios, with their quartiles), top-1 accuracy when labels exist, and agreement with the
full model's predictions.

With a Hugging Face vision-language checkpoint folder as ``--model`` (a LLaVA or Qwen2-VL family
model saved with its processor) it runs the reducer specs on the folder's questions.jsonl when it
ships one, else on a few prompts about one image, and reports prefill FLOPs and time ratios and
agreement with the full model's answers (:mod:`tokred.cli.vlm`).
"""
from __future__ import annotations

import copy
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import tokred
from tokred import Reducer
from tokred.cli import checks, tables, vlm

DEFAULT_REDUCERS = "none,tome:r=2,tome:r=4,tome:r=6,tome:r=8"
#: timing defaults: one thread, read on the CPU-time clock (on a shared or busy CPU, threads of one
#: forward wait for each other and wall-clock rounds take several times longer), untimed warm-up
#: rounds, then interleaved rounds
TIMING = {"threads": 1, "warmup": 2, "rounds": 15}
JSON_NAME = "bench.json"
PLOT_NAME = "flops_vs_accuracy.png"


# reducer specs ------------------------------------------------------------------------------
def parse_reducers(specs: str) -> list[tuple[str, tuple[Reducer, ...]]]:
    """Comma-separated settings -> [(label, reducers)], e.g. ``none,tome:r=8,tome:r=8;-0.5``.

    Each setting is a spec of :func:`tokred.parse_spec`, possibly a ``+`` composition (``none``
    gives no reducers); its label is the spec as written."""
    settings, seen = [], set()
    for item in specs.split(","):
        label = item.strip()
        if not label:
            raise ValueError(f"empty reducer spec in '{specs}'; expected e.g. '{DEFAULT_REDUCERS}'")
        reducers = tokred.parse_spec(label)
        if not reducers:
            label = "none"
        if label in seen:
            raise ValueError(f"reducer '{label}' is listed twice")
        seen.add(label)
        settings.append((label, reducers))
    return settings


# measurements -------------------------------------------------------------------------------
@dataclass
class _Setting:
    label: str
    reducers: tuple[Reducer, ...]
    model: nn.Module
    correct: int = 0
    agree: int = 0
    flops: int = 0
    images: int = 0
    final_tokens: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: what a timing round reads: the process's CPU time (one thread on the CPU: the time the forward
#: computed, without the time other programs held the core), or wall-clock time
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def _time(model: nn.Module, batch: Tensor, clock: str = "wall") -> float:
    read = CLOCKS[clock]
    _sync(batch.device)
    start = read()
    model(batch)
    _sync(batch.device)
    return read() - start


@dataclass
class Evaluation:
    """What :func:`evaluate` measured: ``runs[0]`` is the full model, then one run per setting."""

    runs: list[_Setting]
    has_labels: bool
    first_batch: Tensor

    @property
    def full(self) -> _Setting:
        return self.runs[0]

    def summaries(self) -> list[dict]:
        """:func:`accuracy_summary` of every setting (not of the full model)."""
        return [accuracy_summary(run, self.full, self.has_labels) for run in self.runs[1:]]


def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor | None]],
             settings: list[tuple[str, tuple[Reducer, ...]]], device: str | torch.device = "cpu",
             num_batches: int | None = None, progress: bool = True, shared_model: bool = False) -> Evaluation:
    """Top-1, agreement with the full model, analytic FLOPs and tokens of ``settings`` over ``batches``.

    Every batch runs through the unreduced model first (its predictions are the reference for
    agreement), then through every setting (a label and its reducers, none for the unreduced model).
    With ``shared_model=False`` each setting gets its own
    deep copy of ``model`` with its reducers applied once (the copies are what :func:`run_bench`
    times afterwards; unreduced copies are unpatched again on return). With ``shared_model=True``
    one copy serves every setting and the setting's reducers are applied before each of its
    forwards (the memory of one model, for long sweeps on large models); it is unpatched on
    return. Reducer errors (unsupported model, bad schedule) surface before any batch runs.
    """
    from tqdm import tqdm

    device = torch.device(device)
    base = tokred.remove(copy.deepcopy(model)).to(device).eval()
    runs = [_Setting("full", (), base)]
    for label, reducers in settings:
        if shared_model:
            with tokred.applied(base, *reducers):
                pass
            runs.append(_Setting(label, reducers, base))
            continue
        clone = copy.deepcopy(base)
        if reducers:
            tokred.apply(clone, *reducers)  # errors (unsupported model, bad schedule) surface here
        runs.append(_Setting(label, reducers, clone))

    first_batch = None
    has_labels = None
    with ExitStack() as stack, torch.inference_mode():
        if shared_model:
            stack.callback(tokred.remove, base)
        else:
            for run in runs:  # unreduced models are only instrumented while evaluating, never while timed
                if not run.reducers:
                    stack.enter_context(tokred.applied(run.model))
        bar = tqdm(batches, total=num_batches, desc="evaluating", unit="batch", disable=not progress,
                   file=sys.stdout)
        for images, labels in bar:
            images = images.to(device)
            if first_batch is None:
                first_batch = images
            has_labels = labels is not None if has_labels is None else has_labels
            reference = None
            for run in runs:
                if shared_model:
                    tokred.apply(run.model, *run.reducers)
                prediction = run.model(images).argmax(dim=-1).cpu()
                if reference is None:
                    reference = prediction
                trace = tokred.last_trace(run.model)
                run.flops += tokred.flops(run.model).total
                run.images += images.shape[0]
                run.final_tokens.extend(trace.layers[-1].tokens_per_image or [trace.final_tokens] * len(images))
                run.tokens = trace.tokens()
                run.notes = list(dict.fromkeys(run.notes + trace.notes))
                run.agree += int((prediction == reference).sum())
                if labels is not None:
                    run.correct += int((prediction == labels).sum())
    if first_batch is None:
        raise ValueError("no images to benchmark")
    return Evaluation(runs, bool(has_labels), first_batch)


def accuracy_summary(run: _Setting, full: _Setting, has_labels: bool) -> dict:
    """Tokens, FLOPs and accuracy numbers of one evaluated run (no timing)."""
    flops = run.flops / run.images
    final = sorted(set(run.final_tokens))  # per image: reducers such as Thresholds keep different numbers
    return {
        "reducer": run.label,
        "reducer_repr": ", ".join(map(repr, run.reducers)) or None,
        "tokens_final": final[0] if len(final) == 1 else statistics.mean(run.final_tokens),
        "tokens_per_layer": run.tokens,
        "gflops_per_image": flops / 1e9,
        "gmacs_per_image": flops / 2e9,  # tokred counts FLOPs as 2 x multiply-adds; most papers quote multiply-adds
        "flops_ratio": flops / (full.flops / full.images),
        "top1": run.correct / run.images if has_labels else None,
        "agreement": run.agree / run.images,
        "notes": run.notes,
    }


@contextmanager
def _timing_conditions(threads: int | None) -> Iterator[None]:
    """Inside the block: torch's intra-op CPU threads set to ``threads`` (None: left as they are) and
    Python's garbage collector off (as ``timeit`` does), so that no round pays for another's garbage."""
    before, collecting = torch.get_num_threads(), gc.isenabled()
    if threads is not None:
        torch.set_num_threads(threads)
    gc.disable()
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if collecting:
            gc.enable()


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of ``values`` (inclusive method: one value gives itself)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    first, median, third = statistics.quantiles(values, n=4, method="inclusive")
    return first, median, third


def resolve_clock(clock: str, threads: int | None, device: str | torch.device) -> str:
    """``"cpu"`` or ``"wall"`` for a ``clock`` option (``"auto"``: cpu for one thread on the CPU, else wall)."""
    if clock not in ("auto", *CLOCKS):
        raise ValueError(f"clock must be 'auto', 'cpu' or 'wall', got {clock!r}")
    one_cpu_thread = (threads if threads is not None else torch.get_num_threads()) == 1 and \
        torch.device(device).type == "cpu"
    if clock == "auto":
        clock = "cpu" if one_cpu_thread else "wall"
    if clock == "cpu" and not one_cpu_thread:
        raise ValueError("the cpu clock times one thread on the CPU; use clock='wall' for more threads or a GPU")
    return clock


def run_bench(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor | None]],
              settings: list[tuple[str, tuple[Reducer, ...]]], rounds: int = TIMING["rounds"],
              device: str | torch.device = "cpu", num_batches: int | None = None, progress: bool = True,
              threads: int | None = TIMING["threads"], warmup: int = TIMING["warmup"], clock: str = "auto") -> dict:
    """Benchmark ``settings`` on deep copies of ``model`` over ``batches`` of (images, labels or None).

    Returns a dict with the full model's numbers under ``"full"``, one entry per setting under
    ``"results"`` and how the times were taken under ``"timing"``. Accuracy and FLOPs come from
    :func:`evaluate` (torch's thread setting). Speed: on the first batch, with ``threads`` CPU
    threads (None: torch's setting), ``warmup`` untimed rounds, then ``rounds`` timed rounds; a
    round runs the full model and every setting once each, one after the other, the order rotated
    by one each round. A setting's speed ratio is the median over rounds of (full model's time /
    setting's time) within the round, so both times of a ratio saw the same load on the machine;
    the quartiles of those per-round ratios are reported too. ``clock``: ``"cpu"`` (the process's
    CPU time: with one thread on the CPU, what the forward computed, not the time other programs
    held the core), ``"wall"``, or ``"auto"`` (``"cpu"`` for one thread on the CPU, else ``"wall"``).
    """
    from tqdm import tqdm

    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds} and {warmup}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    clock = resolve_clock(clock, threads, device)
    evaluation = evaluate(model, batches, settings, device=device, num_batches=num_batches, progress=progress)
    runs, full, timing_batch = evaluation.runs, evaluation.full, evaluation.first_batch

    with _timing_conditions(threads), torch.inference_mode():
        used_threads = torch.get_num_threads()
        bar = tqdm(range(warmup + rounds), desc="timing", unit="round", disable=not progress, file=sys.stdout)
        for round_index in bar:
            shift = round_index % len(runs)
            for run in runs[shift:] + runs[:shift]:
                elapsed = _time(run.model, timing_batch, clock)
                if round_index >= warmup:
                    run.times.append(elapsed)

    def summary(run: _Setting) -> dict:
        accuracy = accuracy_summary(run, full, evaluation.has_labels)
        flops_ratio = accuracy["flops_ratio"]
        first, throughput_ratio, third = quartiles([f / t for f, t in zip(full.times, run.times)])
        return {
            **{key: accuracy[key] for key in ("reducer", "reducer_repr", "tokens_final", "tokens_per_layer",
                                               "gflops_per_image", "gmacs_per_image", "flops_ratio")},
            "throughput_ratio": throughput_ratio,
            "throughput_ratio_quartiles": [first, third],
            "predicted_speedup": 1 / flops_ratio,
            "speedup_of_predicted": throughput_ratio * flops_ratio,
            "top1": accuracy["top1"],
            "agreement": accuracy["agreement"],
            "median_time_s": statistics.median(run.times),
            "times_s": run.times,
            "notes": accuracy["notes"],
        }

    timing = {"clock": clock, "threads": used_threads, "warmup_rounds": warmup, "rounds": rounds,
              "batch_size": int(timing_batch.shape[0]), "device": str(timing_batch.device),
              "statistic": "median over rounds of the full model's time / the setting's time in the same round"}
    return {"full": summary(full), "results": [summary(run) for run in runs[1:]], "timing": timing,
            "num_images": full.images, "timing_batch_size": timing["batch_size"], "rounds": rounds,
            "has_labels": evaluation.has_labels}


def timing_description(timing: dict) -> str:
    """One sentence saying how the speed ratios of a :func:`run_bench` report were measured."""
    threads = f"{timing['threads']} CPU thread" + ("s" if timing["threads"] != 1 else "")
    clock = "CPU time" if timing["clock"] == "cpu" else "wall-clock time"
    return (f"speed ratio = full model's {clock} / reduced model's on one batch of {timing['batch_size']} images, "
            f"median over {timing['rounds']} interleaved rounds (after {timing['warmup_rounds']} warm-up rounds), "
            f"{threads}; IQR = quartiles of the per-round ratios")


# data ---------------------------------------------------------------------------------------
def _tensor_batches(images: Tensor, labels: Tensor | None, batch_size: int) -> Iterator[tuple[Tensor, Tensor | None]]:
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size], None if labels is None else labels[start:start + batch_size]


def _loader_batches(loader) -> Iterator[tuple[Tensor, Tensor]]:
    for images, labels in loader:
        yield images, labels


def load_model_and_data(args):
    """Model, batches, number of batches, a description and notes, from the options of :func:`add_model_arguments`.

    No ``--model``: the embedded reference ViT on its held-out digits. ``--model`` alone: that timm
    model on seeded random images (agreement only). ``--model --data``: an ImageFolder with the
    model's timm transform.
    """
    import math

    notes = []
    if args.model is None:
        if args.data is not None:
            raise ValueError("--data needs --model: the embedded reference model only runs on its digits split")
        if args.pretrained:
            raise ValueError("--pretrained needs --model (the embedded reference model is always trained)")
        from tokred.reference import load_reference_data, load_reference_model

        model = load_reference_model()
        images, labels = load_reference_data()
        if args.limit is not None:
            images, labels = images[:args.limit], labels[:args.limit]
        batches = _tensor_batches(images, labels, args.batch_size)
        return (model, batches, math.ceil(len(images) / args.batch_size),
                {"model": "tokred reference ViT (digits)", "data": "reference digits held-out split"}, notes)

    from timm.data import create_transform, resolve_data_config

    model = checks.timm_model(args.model, args.pretrained)
    if not args.pretrained:
        notes.append(f"{args.model} has random weights (pass --pretrained to download trained ones)")
    config = resolve_data_config({}, model=model)
    if args.data is None:
        count = args.limit if args.limit is not None else 64
        generator = torch.Generator().manual_seed(0)
        pixels = torch.rand(count, *config["input_size"], generator=generator)
        mean = torch.tensor(config["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(config["std"]).view(1, -1, 1, 1)
        images = (pixels - mean) / std
        notes.append(f"no --data: {count} random images (uniform pixels, normalised for the model); "
                     "agreement only, accuracy n/a")
        return (model, _tensor_batches(images, None, args.batch_size), math.ceil(count / args.batch_size),
                {"model": args.model, "data": "random images (uniform pixels, seed 0)"}, notes)

    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(args.data), transform=create_transform(**config))
    if len(dataset) == 0:
        raise ValueError(f"no images found in {args.data}")
    if args.limit is not None and args.limit < len(dataset):
        generator = torch.Generator().manual_seed(0)
        subset = torch.randperm(len(dataset), generator=generator)[:args.limit].sort().values.tolist()
        dataset = torch.utils.data.Subset(dataset, subset)
        notes.append(f"--limit: a fixed random subset (seed 0) of {args.limit} images")
    notes.append("accuracy assumes the sorted class-folder order matches the model's class indices")
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=getattr(args, "workers", 0))
    return (model, _loader_batches(loader), len(loader),
            {"model": args.model, "data": str(args.data), "data_config": {k: (list(v) if isinstance(v, tuple) else v)
                                                                          for k, v in config.items()}}, notes)


# output -------------------------------------------------------------------------------------
def format_table(report: dict) -> str:
    """The results as a Markdown table (:func:`tokred.cli.tables.markdown`), one row per setting."""
    rows = [[row["reducer"], f"{row['tokens_final']:g}", f"{row['gflops_per_image']:.4f}",
             f"{row['gmacs_per_image']:.4f}", f"{row['flops_ratio']:.3f}", f"{row['throughput_ratio']:.3f}",
             "{:.2f}-{:.2f}".format(*row["throughput_ratio_quartiles"]), tables.percent(row["top1"]),
             tables.percent(row["agreement"])]
            for row in report["results"]]
    return tables.markdown(rows, ["reducer", "tokens after last block", "GFLOPs/img", "GMACs/img", "FLOPs ratio",
                                  "speed ratio", "IQR", "top-1", "agreement"])


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_top1 = report["has_labels"]
    key, name = ("top1", "top-1 accuracy (%)") if use_top1 else ("agreement", "agreement with full model (%)")
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    xs = [row["flops_ratio"] for row in report["results"]]
    ys = [100 * row[key] for row in report["results"]]
    ax.plot(xs, ys, "o", color="tab:blue")
    for row, x, y in zip(report["results"], xs, ys):
        ax.annotate(row["reducer"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("FLOPs ratio (reduced / full)")
    ax.set_ylabel(name)
    ax.set_title(f"{report['settings']['model']}: FLOPs vs {'accuracy' if use_top1 else 'agreement'}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.12, y=0.15)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# command line -------------------------------------------------------------------------------
def add_model_arguments(parser, checkpoints: bool = False, limit: str = "maximum number of images") -> None:
    """The model and data options shared by ``tokred bench`` and ``tokred sweep`` (``checkpoints``:
    ``--model`` also takes a Hugging Face VLM checkpoint folder; ``limit``: the help of ``--limit``)."""
    parser.add_argument("--model", default=None,
                        help="timm ViT name" + (" or a Hugging Face VLM checkpoint folder (config.json, weights, "
                                                "processor)" if checkpoints else "")
                             + " (default: the embedded reference ViT on its digits split)")
    parser.add_argument("--pretrained", action="store_true",
                        help="download pretrained weights for --model (nothing is downloaded without it)")
    parser.add_argument("--data", type=Path, default=None,
                        help="ImageFolder directory (e.g. ImageNet val) evaluated with the model's timm transform")
    parser.add_argument("--limit", type=int, default=None, help=limit)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps (default cpu)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for --data")


def check_model_arguments(args) -> None:
    """Clear errors for the options of :func:`add_model_arguments`."""
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    checks.device(args.device)
    checks.model(args.model)


def versions() -> dict[str, str]:
    """Versions recorded in the JSON reports."""
    import numpy
    import timm

    return {"tokred": tokred.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def add_arguments(parser) -> None:
    add_model_arguments(parser, checkpoints=True,
                        limit="maximum number of images; for a VLM checkpoint, of prompts (with its questions.jsonl: "
                              f"questions per question family, default {vlm.PER_FAMILY})")
    parser.add_argument("--reducers", default=None,
                        help=f"comma-separated reducer specs, any registered reducer (default: {DEFAULT_REDUCERS}; "
                             f"for a VLM checkpoint {vlm.DEFAULT_REDUCERS}); e.g. "
                             "'none,tome:r=8,tome:r=8/prop_attn=false,tome:r=8;-0.5,pool:stride=1;2' "
                             "(the grammar: tokred.parse_spec)")
    parser.add_argument("--rounds", type=int, default=TIMING["rounds"],
                        help=f"interleaved timing rounds (default {TIMING['rounds']}, after {TIMING['warmup']} "
                             "untimed warm-up rounds)")
    parser.add_argument("--out", type=Path, default=Path("results/bench"), help="output directory")
    parser.add_argument("--threads", type=int, default=TIMING["threads"],
                        help=f"torch CPU threads for the timing rounds (default {TIMING['threads']}: on a shared or "
                             "busy machine more threads wait for each other and the ratios become noise; 0: torch's "
                             "own setting); accuracy and FLOPs are evaluated with torch's setting")
    parser.add_argument("--clock", choices=("auto", *CLOCKS), default="auto",
                        help="what the timing rounds read: the process's CPU time (with one thread: the time the "
                             "forward computed, not the time other programs held the core) or wall-clock time "
                             "(default auto: cpu for one thread on the CPU, else wall)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--image", type=Path, default=None,
                        help="VLM checkpoint only: the image the prompts ask about (default: the sample photo; "
                             "given, the folder's questions.jsonl is not used)")
    parser.add_argument("--prompts", type=Path, default=None,
                        help="VLM checkpoint only: a text file of prompts about --image, one per line, used as written "
                             "when they hold the image token, else put in the chat template (default: the folder's "
                             "questions.jsonl, else a few generic questions, tokred.cli.vlm.QUESTIONS)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"VLM checkpoint only: greedy answer length (default {vlm.MAX_NEW_TOKENS})")


def main(args) -> int:
    check_model_arguments(args)
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 1, or 0 for torch's own setting, got {args.threads}")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    if vlm.is_checkpoint(args.model):
        return vlm.main(args, parse_reducers)
    if args.image is not None or args.prompts is not None or args.max_new_tokens is not None:
        raise ValueError("--image, --prompts and --max-new-tokens are for a VLM checkpoint as --model (the reference "
                         "model and timm models run on their data)")
    args.reducers = args.reducers or DEFAULT_REDUCERS
    settings = parse_reducers(args.reducers)
    model, batches, num_batches, described, notes = load_model_and_data(args)
    for note in notes:
        print(f"note: {note}")
    report = run_bench(model, batches, settings, rounds=args.rounds, device=args.device,
                       num_batches=num_batches, progress=not args.no_progress, threads=args.threads or None,
                       clock=args.clock)
    report["settings"] = {**described, "pretrained": args.pretrained, "limit": args.limit,
                          "batch_size": args.batch_size, "device": str(args.device), "rounds": args.rounds,
                          "reducers": [label for label, _ in settings], "threads": report["timing"]["threads"],
                          "notes": notes}
    report["versions"] = versions()
    print()
    print(f"{described['model']} on {described['data']}: {report['num_images']} images; GFLOPs = 2 x GMACs "
          f"(multiply-adds), analytic; {timing_description(report['timing'])}")
    print(format_table(report))
    for row in report["results"]:
        for note in row["notes"][:3]:
            print(f"  {row['reducer']}: {note}")
        if len(row["notes"]) > 3:
            print(f"  {row['reducer']}: ... {len(row['notes']) - 3} more notes in the JSON")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / JSON_NAME, args.out / PLOT_NAME
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0
