"""``tokred sweep --model <VLM checkpoint folder>``: accuracy per question family against prefill FLOPs.

Every setting (reducer spec) answers every question of a question file greedily; the report gives,
per setting and question family, the accuracy with a 95% Wilson interval and the agreement with the
unreduced model's answers (the part of the unreduced answer that is scored, taken as the truth), and per setting the prefill FLOPs ratio (:func:`tokred.flops`, reduced /
unreduced, on the first batch) and the time-to-first-token ratio (the prefill of the first batch,
timed in interleaved rounds in one process, median; noisy on shared CPUs).

The question file is JSON Lines, one question per line (paths relative to the file)::

    {"image": "img/0001.png", "question": "What digit is at row 2 column 3?", "answer": "7",
     "family": "cell", "score": "exact"}

``image`` (one path) or ``images`` (a list) or ``frames`` (a list of video frames, one clip); either
``question`` (wrapped in the processor's chat template, or LLaVA-1.5's ``USER: <image>\\n... ASSISTANT:``,
one image) or ``prompt`` (used as written, with the processor's image token(s) in it); ``answer``;
optional ``family`` (default ``all``) and ``score`` (:data:`SCORES`, default ``exact``).
A checkpoint folder that holds a ``questions.jsonl`` (the shipped digits VLM does) is swept on it when
``--questions`` is not given.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

#: how a generated answer is scored against ``answer`` (both lower-cased, whitespace-normalised,
#: a trailing full stop dropped): ``exact`` the whole answer; ``last_word`` the last word of the
#: generated text; ``words`` word by word in order (credit = matching words / answer words; the
#: whole answer right counts as its exact match)
SCORES = ("exact", "last_word", "words")
#: fractions of the visual tokens the default VLM sweep keeps
KEEPS = (0.5, 0.25, 0.125, 0.0625)
#: Pool windows that keep the same fractions of a square grid (1x2, 2x2, 2x4, 4x4)
POOL_STRIDES = {0.5: "1;2", 0.25: "2", 0.125: "2;4", 0.0625: "4"}
#: the default VLM sweep: label -> spec with ``{keep}`` (``{stride}`` for Pool; ``{r}`` for ToMe in the
#: vision tower, the tokens merged per block that leave about ``keep`` of them), one row per keep
VLM_SWEEPS = {
    "tome (vision)": "tome:r={r}",
    "divprune": "divprune:keep={keep}",
    "divprune (kept positions)": "divprune:keep={keep}/positions=keep",
    "random": "random:keep={keep}/stage=projector",
    "pool": "pool:stride={stride}/stage=projector",
    "dart": "dart:keep={keep}/layer=2",
    "fastv": "fastv:keep={keep}/layer=2",
}
JSON_NAME, MARKDOWN_NAME, PLOT_NAME = "sweep_vlm.json", "sweep_vlm.md", "sweep_vlm.png"
README_START, README_END = "<!-- sweep-vlm:start -->", "<!-- sweep-vlm:end -->"
README_IMAGE = "docs/sweep_vlm.png"


@dataclass(frozen=True)
class Question:
    """One question: its images (paths or PIL images) or video frames, the prompt or question text,
    the expected answer, its family and how it is scored."""

    answer: str
    question: str | None = None
    prompt: str | None = None
    images: tuple = ()
    frames: tuple = ()
    family: str = "all"
    score: str = "exact"


def read_questions(path: Path) -> list[Question]:
    """The questions of a JSON Lines file (format in the module docstring), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file {path} not found")
    questions = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not JSON ({error})") from None
        unknown = set(record) - {"image", "images", "frames", "question", "prompt", "answer", "family", "score"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        if ("question" in record) == ("prompt" in record):
            raise ValueError(f"{where}: give exactly one of 'question' and 'prompt'")
        if "answer" not in record:
            raise ValueError(f"{where}: no 'answer'")
        images = [record["image"]] if "image" in record else list(record.get("images", []))
        frames = list(record.get("frames", []))
        if "image" in record and "images" in record:
            raise ValueError(f"{where}: give 'image' or 'images', not both")
        if not images and not frames:
            raise ValueError(f"{where}: no 'image', 'images' or 'frames'")
        if "question" in record and len(images) + bool(frames) != 1:
            raise ValueError(f"{where}: a 'question' is asked about one image or one clip; "
                             "use 'prompt' (with the image tokens in it) for several")
        score = record.get("score", "exact")
        if score not in SCORES:
            raise ValueError(f"{where}: score {score!r} is not one of {SCORES}")
        for item in images + frames:
            if not (path.parent / item).is_file():
                raise FileNotFoundError(f"{where}: image {path.parent / item} not found")
        questions.append(Question(answer=str(record["answer"]), question=record.get("question"),
                                  prompt=record.get("prompt"), images=tuple(path.parent / i for i in images),
                                  frames=tuple(path.parent / f for f in frames),
                                  family=str(record.get("family", "all")), score=score))
    if not questions:
        raise ValueError(f"{path} holds no questions")
    return questions


def per_family(questions: list[Question], limit: int | None) -> list[Question]:
    """The first ``limit`` questions of each family (all with None), in the file's order."""
    if limit is None:
        return list(questions)
    seen: dict[str, int] = {}
    kept = []
    for question in questions:
        seen[question.family] = seen.get(question.family, 0) + 1
        if seen[question.family] <= limit:
            kept.append(question)
    return kept


def normalise(text: str) -> str:
    return " ".join(text.lower().split()).removesuffix(".").strip()


def scored_part(question: Question, generated: str) -> str:
    """What :func:`score` compares of a generated answer: its last word (``last_word``), else all of it."""
    return " ".join(normalise(generated).split()[-1:]) if question.score == "last_word" else generated


def score(question: Question, generated: str) -> tuple[int, int, bool]:
    """(credit, out of, exact) of one generated answer: ``words`` credits each answer word in order,
    the other rules give 1 or 0 out of 1."""
    answer, said = normalise(question.answer), normalise(generated)
    if question.score == "words":
        truth = answer.split()
        credit = sum(a == b for a, b in zip(said.split(), truth))
        return credit, len(truth), credit == len(truth)
    right = (said.split()[-1:] == answer.split()) if question.score == "last_word" else said == answer
    return int(right), 1, right


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of k successes in n trials."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def tower_shape(config) -> tuple[int, int] | None:
    """(patch tokens, tower blocks whose output the projector sees) of a LLaVA-style model's ``config``
    with a square single-resolution tower and one feature layer; None otherwise (no vision-stage row then)."""
    vision = getattr(config, "vision_config", None)
    layer = getattr(config, "vision_feature_layer", None)
    if vision is None or not isinstance(layer, int) or not hasattr(vision, "patch_size"):
        return None
    blocks = vision.num_hidden_layers + 1 + layer if layer < 0 else layer
    return (vision.image_size // vision.patch_size) ** 2, blocks


def default_settings(keeps=KEEPS, names=None, tower: tuple[int, int] | None = None) -> list[tuple[str, str, float]]:
    """[(family label, spec, keep)] of :data:`VLM_SWEEPS` at each keep fraction; the vision-stage
    rows need ``tower`` = (patch tokens, blocks), see :func:`tower_shape`."""
    names = [n for n in VLM_SWEEPS if tower is not None or "{r}" not in VLM_SWEEPS[n]] if names is None else names
    unknown = [n for n in names if n not in VLM_SWEEPS]
    if unknown:
        raise ValueError(f"no default VLM sweep for {unknown}; defaults: {', '.join(VLM_SWEEPS)}")
    bad = [k for k in keeps if k not in POOL_STRIDES]
    if "pool" in names and bad:
        raise ValueError(f"pool has windows for the keeps {sorted(POOL_STRIDES)} only, not {bad}")
    if tower is None and any("{r}" in VLM_SWEEPS[n] for n in names):
        raise ValueError("this model's tower has no single square patch grid: the vision-stage rows cannot be set")
    settings = []
    for name in names:
        for keep in keeps:
            r = None if tower is None else max(1, round(tower[0] * (1 - keep) / tower[1]))
            settings.append((name, VLM_SWEEPS[name].format(keep=keep, stride=POOL_STRIDES.get(keep), r=r), keep))
    return settings


# running -------------------------------------------------------------------------------------------
def _load_image(item):
    from PIL import Image

    from tokred.cli import checks

    return item.convert("RGB") if isinstance(item, Image.Image) else checks.image(item, option="image")


def prompt_text(processor, question: Question) -> str:
    """The text the model reads for ``question``: its ``prompt`` as written, or its ``question`` in the
    processor's chat template (:func:`tokred.cli.vlm.prompts`)."""
    from tokred.cli import vlm

    return question.prompt if question.prompt is not None else vlm.prompts(processor, [question.question])[0]


def model_inputs(processor, questions: list[Question], device="cpu") -> dict:
    """One left-padded batch of processor inputs for ``questions``, on ``device``."""
    texts = [prompt_text(processor, q) for q in questions]
    images = [_load_image(i) for q in questions for i in q.images]
    videos = [[_load_image(f) for f in q.frames] for q in questions if q.frames]
    kwargs = {"images": images} if images else {}
    if videos:
        kwargs["videos"] = videos
    tokenizer = getattr(processor, "tokenizer", processor)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return {name: value.to(device) for name, value in processor(text=texts, padding=True, return_tensors="pt",
                                                                     **kwargs).items()}
    finally:
        tokenizer.padding_side = side


def generate(model, processor, inputs: dict, max_new_tokens: int) -> list[str]:
    import torch

    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def prefill_seconds(model, inputs: dict, settings, rounds: int, clock=time.perf_counter) -> list[float]:
    """Median prefill time of ``inputs`` per setting, the settings interleaved in every round (one
    untimed warm-up round first); ``clock`` reads the time."""
    import torch

    import tokred

    times = [[] for _ in settings]
    for round_ in range(rounds + 1):
        for i, (_, reducers) in enumerate(settings):
            with tokred.applied(model, *reducers), torch.inference_mode():
                start = clock()
                model(**inputs)
                elapsed = clock() - start
            if round_:
                times[i].append(elapsed)
    return [statistics.median(t) for t in times]


def visual_tokens(model, trace, inputs: dict, questions: list[Question]) -> tuple[list[int], list[int]] | None:
    """Per question, the visual tokens entering the language model and those left at its last layer,
    from the prefill's ``trace``: entering = the ``projector`` record's count per image (summed over a
    question's images); at the last layer = that minus what ``llm``-stage plans removed (each sample's
    length after the last plan minus its text tokens, which are never pruned). None when the trace
    has no per-image count for every question (e.g. no projector record)."""
    projector = [r for r in trace.layers if r.stage == "projector"] if trace is not None else []
    if not projector:
        return None
    record = projector[-1]
    per_image = record.tokens_per_image or [record.tokens_out // trace.batch_size] * trace.batch_size
    images = [len(q.images) + bool(q.frames) for q in questions]
    if len(per_image) != sum(images):
        return None
    starts = [sum(images[:i]) for i in range(len(images))]
    entering = [sum(per_image[s:s + n]) for s, n in zip(starts, images)]
    ids = [getattr(model.config, name, None) for name in ("image_token_id", "image_token_index", "video_token_id")]
    prompt_visual = sum((inputs["input_ids"] == i).sum(1) for i in set(ids) if i is not None)
    text = (inputs["attention_mask"].sum(1) - prompt_visual).tolist()
    last = entering
    for rec in trace.layers:
        if rec.stage == "llm" and rec.tokens_per_image is not None:
            last = [n - t for n, t in zip(rec.tokens_per_image, text)]
    return entering, last


def per_image_flops(model, processor, questions: list[Question]) -> float:
    """Mean analytic prefill FLOPs of ``questions``, each run alone (no padding: what an image costs
    when its budget differs from its neighbours')."""
    import tokred

    return statistics.mean(tokred.flops(model, **model_inputs(processor, [q], model.device)).total for q in questions)


def run(model, processor, questions: list[Question], settings, batch_size: int = 32, max_new_tokens: int = 32,
        rounds: int = 5, progress: bool = True, flops_sample: int = 16) -> dict:
    """Answers and scores of every setting ``[(family, spec, keep, reducers)]`` (the unreduced model is
    added first), the FLOPs and prefill-time ratios, the visual tokens per question (mean and
    population std over all questions, see :func:`visual_tokens`) and the per-image FLOPs ratio (mean
    over ``flops_sample`` questions evenly spread over the file, each alone); the report :func:`main` writes."""
    import torch
    from tqdm import tqdm

    import tokred

    settings = [("none", "none", 1.0, ())] + [s for s in settings if s[3]]
    batches = [questions[i:i + batch_size] for i in range(0, len(questions), batch_size)]
    families = list(dict.fromkeys(q.family for q in questions))
    probe = model_inputs(processor, batches[0], model.device)
    sample = questions[::max(1, math.ceil(len(questions) / flops_sample))]
    seconds = prefill_seconds(model, probe, [(s[1], s[3]) for s in settings], rounds)
    bar = tqdm(total=len(settings) * len(batches), desc="sweep", unit="batch", disable=not progress)
    rows, full_answers = [], None
    for (family, spec, keep, reducers), prefill in zip(settings, seconds):
        with tokred.applied(model, *reducers):
            with torch.inference_mode():
                model(**probe)
            trace = tokred.last_trace(model)
            llm = trace.tokens("llm") if trace is not None else []
            report = tokred.flops(model, **probe)
            alone = per_image_flops(model, processor, sample)
            answers, entering, last = [], [], []
            for batch in batches:
                inputs = model_inputs(processor, batch, model.device)
                answers += generate(model, processor, inputs, max_new_tokens)
                counts = visual_tokens(model, tokred.last_trace(model), inputs, batch)   # the prefill's trace
                if counts is not None:
                    entering += counts[0]
                    last += counts[1]
                bar.update()
        if full_answers is None:
            full_answers, full_flops, full_seconds, full_alone = answers, report.total, prefill, alone
        per_family = {}
        for name in families:
            mine = [(q, a, b) for q, a, b in zip(questions, answers, full_answers) if q.family == name]
            scored = [score(q, a) for q, a, _ in mine]
            credit, total = sum(s[0] for s in scored), sum(s[1] for s in scored)
            agreed = [score(replace(q, answer=scored_part(q, b)), a) for q, a, b in mine]
            per_family[name] = {"n": len(mine), "accuracy": credit / total, "ci95": wilson(credit, total),
                                "exact_match": sum(s[2] for s in scored) / len(mine),
                                "agreement": sum(s[0] for s in agreed) / sum(s[1] for s in agreed)}
        rows.append({"family": family, "spec": spec, "keep": keep, "llm_tokens_last_layer": llm[-1] if llm else None,
                     "prefill_gflops": report.total / 1e9, "prefill_gmacs": report.total / 2e9,
                     "flops_ratio": report.total / full_flops, "flops_ratio_per_image": alone / full_alone,
                     "visual_tokens": _spread(entering, last, len(questions)), "prefill_seconds": prefill,
                     "ttft_ratio": prefill / full_seconds, "families": per_family,
                     "answers": answers})
    bar.close()
    return {"families": families, "questions": len(questions), "probe_batch": len(batches[0]),
            "flops_sample": len(sample), "timing_rounds": rounds, "results": rows}


def _spread(entering: list[int], last: list[int], questions: int) -> dict | None:
    """Mean and population standard deviation of the visual tokens per question (None unless every
    question was counted)."""
    if len(entering) != questions:
        return None
    return {"mean": statistics.mean(entering), "std": statistics.pstdev(entering),
            "last_mean": statistics.mean(last), "last_std": statistics.pstdev(last)}


# reporting ---------------------------------------------------------------------------------------
def format_tokens(spread: dict | None) -> str:
    """Visual tokens per question as ``mean ± std``, with ``→ mean ± std`` at the last LM layer when
    ``llm``-stage plans removed some; ``?`` when they were not counted."""
    if spread is None:
        return "?"
    text = f"{spread['mean']:.1f} ± {spread['std']:.1f}"
    if spread["last_mean"] != spread["mean"] or spread["last_std"] != spread["std"]:
        text += f" → {spread['last_mean']:.1f} ± {spread['last_std']:.1f}"
    return text


def format_markdown(report: dict) -> str:
    """One row per setting: tokens at the last LM layer (the batch's, padded), visual tokens per
    question (mean ± std), FLOPs ratios (first batch; each image alone) and the TTFT ratio, accuracy per
    family (95% interval) and the mean agreement with the unreduced model."""
    from tokred.cli import tables

    families = report["families"]
    rows = []
    for row in report["results"]:
        cells = [f"{100 * row['families'][f]['accuracy']:.1f} ({100 * row['families'][f]['ci95'][0]:.1f}–"
                 f"{100 * row['families'][f]['ci95'][1]:.1f})" for f in families]
        agreement = statistics.mean(row["families"][f]["agreement"] for f in families)
        rows.append([row["family"], f"`{row['spec']}`", row["llm_tokens_last_layer"],
                     format_tokens(row["visual_tokens"]), f"{row['flops_ratio']:.3f}",
                     f"{row['flops_ratio_per_image']:.3f}", f"{row['ttft_ratio']:.2f}", *cells,
                     tables.percent(agreement, 1)])
    return tables.markdown(rows, ["reducer", "spec", "tokens at the last LM layer", "visual tokens (mean ± std)",
                                  "prefill FLOPs ratio", "per image", "TTFT ratio",
                                  *(f"{f} % (95% CI)" for f in families), "agreement"],
                           align="llrrrrr" + "r" * len(families) + "r")


def plot(report: dict, path: Path, title: str, x: str = "flops_ratio") -> None:
    """Accuracy against the prefill FLOPs ratio (``x``: a row's ``flops_ratio`` or ``flops_ratio_per_image``),
    one panel per question family, one line per reducer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = report["families"]
    full = report["results"][0]
    reducers = list(dict.fromkeys(row["family"] for row in report["results"][1:]))
    columns = min(3, len(families))
    rows_ = math.ceil(len(families) / columns)
    fig, axes = plt.subplots(rows_, columns, figsize=(4.2 * columns, 3.6 * rows_), dpi=110, squeeze=False)
    colours = plt.get_cmap("tab10" if len(reducers) <= 10 else "tab20")
    for ax, name in zip(axes.flat, families):
        ax.axhline(100 * full["families"][name]["accuracy"], color="black", linestyle="--", linewidth=1,
                   label="unreduced")
        for k, reducer in enumerate(reducers):
            points = sorted((r[x], 100 * r["families"][name]["accuracy"])
                            for r in report["results"] if r["family"] == reducer)
            ax.plot(*zip(*points), "o-", color=colours(k % colours.N), markersize=3.5, linewidth=1.3, label=reducer)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("prefill FLOPs ratio" + (" (each image alone)" if x == "flops_ratio_per_image" else ""))
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(families):]:
        ax.set_axis_off()
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def write_report(report: dict, out: Path, names: tuple[str, str, str], header: str, markdown: str, title: str,
                 x: str = "flops_ratio") -> list[Path]:
    """Print the header and table, and write the report's JSON, Markdown and plot (``names``) to ``out``."""
    print(header)
    print(markdown)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in names]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(f"{header}\n\n{markdown}\n")
    plot(report, paths[2], title, x=x)
    print(f"wrote {', '.join(map(str, paths))}")
    return paths


# command line ------------------------------------------------------------------------------------
def main(args, settings_of) -> int:
    """``tokred sweep --model DIR``; ``settings_of(args, config)`` gives [(family, spec, keep)] for the
    checkpoint's config. The question file and the specs are checked before the model loads."""
    import tokred
    from tokred.cli import bench, checks, require, sweep, vlm

    require("transformers", "a Hugging Face checkpoint as --model")
    from transformers import AutoConfig

    if args.questions is None and not (Path(args.model) / "questions.jsonl").is_file():
        raise FileNotFoundError(f"{args.model} ships no questions.jsonl: pass --questions FILE.jsonl "
                                "(format: tokred sweep --help)")
    path = args.questions or Path(args.model) / "questions.jsonl"
    questions = per_family(read_questions(path), args.limit)
    device = checks.device(args.device)
    settings = settings_of(args, AutoConfig.from_pretrained(args.model, local_files_only=True))
    parsed = [(family, spec, keep, tuple(tokred.parse_spec(spec))) for family, spec, keep in settings]
    model, processor = vlm.load(Path(args.model))
    model.to(device)
    report = run(model, processor, questions, parsed, batch_size=args.batch_size,
                 max_new_tokens=args.max_new_tokens, rounds=args.rounds, progress=not args.no_progress)
    report["settings"] = {"model": str(args.model), "model_class": type(model).__name__, "questions": str(path),
                          "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                          "device": str(args.device)}
    report["versions"] = bench.versions()
    header = (f"{args.model} ({type(model).__name__}) on {len(questions)} questions of {path}: greedy answers; "
              f"FLOPs ratio = analytic prefill FLOPs reduced / full; TTFT ratio = median prefill time of the first "
              f"batch ({report['probe_batch']} questions) over {args.rounds} interleaved rounds, reduced / full")
    markdown = format_markdown(report)
    paths = write_report(report, args.out, (JSON_NAME, MARKDOWN_NAME, PLOT_NAME), header, markdown,
                         f"{Path(args.model).name}: accuracy vs prefill FLOPs ({len(questions)} questions)")
    if args.readme is not None:
        sweep.publish(args.readme, markdown, paths[2], image=README_IMAGE, markers=(README_START, README_END),
                      alt="prefill FLOPs ratio versus accuracy per question family, one line per reducer")
    return 0
