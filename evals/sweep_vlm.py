"""Accuracy versus prefill FLOPs of the vision-language reducers on the shipped digits VLM.

Writes the test split of ``evals/vlm_data.py`` as a question file (PNG scenes + ``questions.jsonl``,
the format ``tokred sweep --help`` documents) and runs ``tokred sweep`` on it: every reducer of the
default VLM sweep at 1/2, 1/4, 1/8 and 1/16 of the 64 visual tokens, greedy answers, accuracy per
question family with a 95% Wilson interval (``describe``: per cell, scored word by word; the interval
over cells, which are not independent within an image, is too narrow there), agreement with the
unreduced model, prefill FLOPs and time-to-first-token ratios.

A video checkpoint (``LlavaOnevisionForConditionalGeneration``, ``evals/train_vlm.py --video``) is
swept on the clip families (``vlm_data.VIDEO_FAMILIES``): each clip is written as its frames' PNGs
(a ``frames`` record), ``frames`` scored word by word, budgets relative to its 128 frame tokens; its
default settings are :data:`VIDEO_SPECS` (the video reducers at matched budgets), and ``--readme``
fills ``<!-- sweep-vlm-video:start -->`` .. ``<!-- sweep-vlm-video:end -->`` and docs/sweep_vlm_video.png.

Usage: python evals/sweep_vlm.py [--per-family 2000] [--families describe ...] [tokred sweep options]
  e.g. python evals/sweep_vlm.py --readme            (the README's table and docs/sweep_vlm.png)
       python evals/sweep_vlm.py --per-family 100 --keeps 0.25,0.125
       python evals/sweep_vlm.py --export assets/digits_vlm --slice   (the question file the checkpoint ships)
       python evals/sweep_vlm.py --checkpoint assets/digits_vlm_video --families frames --per-family 100 \
           --rounds 2 --readme                        (the README's video table and docs/sweep_vlm_video.png)
Options it does not know go to ``tokred sweep`` (``--reducers``, ``--specs``, ``--keeps``...).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

from tokred.cli import main as tokred_main
from tokred.reference import assets_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_vlm  # noqa: E402
import vlm_data  # noqa: E402

#: the video sweep's settings, at 1/4 and 1/8 of the 128 frame tokens (32 and 16 tokens reach the language
#: model, plus the newline), each projector reducer with the model's renumbered positions and with kept ones:
#: HoliTom's retain calibrated to that count (tau as its scripts pair it: 0.8, and 0.65 with retain 0.10), its
#: inner stage halving the tokens before decoder layer 2 of 4 (FastV's layer); VisionZip 3 + 1 and 2 + 0 tokens
#: per frame (its 54 : 10 split); DyCoke's TTM, whose first frame per window stays whole, with one 8-frame
#: window (2 and 0 tokens in each later frame: 30 and 16 tokens)
VIDEO_BUDGETS = (  # each projector reducer at 1/4 and at 1/8; {} takes its positions setting
    "holitom:retain=0.23/tau=0.8{}+holitom_inner:keep=0.5/layer=2",
    "holitom:retain=0.11/tau=0.65{}+holitom_inner:keep=0.5/layer=2",
    "holitom:retain=0.23/tau=0.8{}", "holitom:retain=0.11/tau=0.65{}",
    "visionzip:dominant=3/contextual=1{}", "visionzip:dominant=2/contextual=0{}",
    "dycoke:keep=0.125/window=8{}", "dycoke:keep=0.0/window=8{}",
    "uniform:keep=0.25{}", "uniform:keep=0.125{}",
    "divprune:keep=0.25{}", "divprune:keep=0.125{}",
)
VIDEO_SPECS = ",".join([spec.format(positions) for positions in ("", "/positions=keep") for spec in VIDEO_BUDGETS]
                       + ["fastv:keep=0.25/layer=2", "fastv:keep=0.125/layer=2"])
VIDEO_README = ("<!-- sweep-vlm-video:start -->", "<!-- sweep-vlm-video:end -->")
VIDEO_IMAGE = "docs/sweep_vlm_video.png"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=assets_dir() / "digits_vlm")
    p.add_argument("--per-family", type=int, default=2000)
    p.add_argument("--families", nargs="+", default=None, choices=vlm_data.FAMILIES + vlm_data.VIDEO_FAMILIES,
                   help="default: every family of the checkpoint's kind (scenes, or clips for a OneVision checkpoint)")
    p.add_argument("--questions-dir", type=Path, default=None,
                   help="where the test split is written as a question file (default: "
                        "results/digits_vlm_questions, or results/digits_vlm_video_questions for clips)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: results/sweep_vlm, or results/sweep_vlm_video for clips)")
    p.add_argument("--readme", type=Path, nargs="?", const=Path("README.md"), default=None,
                   help="also put the table and the plot into this README (default ./README.md): between the "
                        "sweep-vlm markers, or for a video checkpoint the sweep-vlm-video markers")
    p.add_argument("--export", type=Path, default=None,
                   help="only write the question file into this folder (questions.jsonl + questions/*.png)")
    p.add_argument("--slice", action="store_true",
                   help=f"with --export: the fixed test slice the CI test scores ({sum(vlm_data.SLICE.values())} "
                        "questions: vlm_data.SLICE)")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_known_args(argv)


def export(folder: Path, counts: dict[str, int], split: str = "test") -> Path:
    """Write ``counts[family]`` examples of each family of ``split`` as PNGs and ``questions.jsonl``
    (the digits prompt as written; ``describe`` scored word by word, the questions by their last word,
    since the model writes the description before the answer)."""
    images = folder / "questions"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for family, count in counts.items():
        for ex in vlm_data.examples(split, family, count):
            if isinstance(ex, vlm_data.Clip):   # a clip: one PNG per frame
                names = [f"{family}_{ex.index:04d}_{t}.png" for t in range(len(ex.frames))]
                for name, frame in zip(names, ex.frames):
                    Image.fromarray(frame).save(images / name)
                where = {"frames": [f"questions/{name}" for name in names]}
            else:
                name = f"{family}_{ex.index:04d}.png"
                Image.fromarray(ex.image).save(images / name)
                where = {"image": f"questions/{name}"}
            lines.append(json.dumps({**where, "prompt": vlm_data.prompt(ex), "answer": ex.answer, "family": family,
                                     "score": "words" if family in vlm_data.DENSE else "last_word"}))
    path = folder / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    args, rest = parse_args(argv)
    video = json.loads((args.checkpoint / "config.json").read_text())["model_type"] == "llava_onevision"
    args.families = args.families or list(vlm_data.VIDEO_FAMILIES if video else vlm_data.FAMILIES)
    if args.export is not None:
        chosen = vlm_data.VIDEO_SLICE if video else vlm_data.SLICE
        counts = chosen if args.slice else {f: args.per_family for f in args.families}
        print(f"wrote {export(args.export, counts)}")
        return 0
    if args.readme is not None and video:  # before the run, which takes a while
        text = args.readme.read_text() if args.readme.is_file() else ""
        if any(text.count(marker) != 1 for marker in VIDEO_README):
            raise SystemExit(f"--readme {args.readme}: needs a file holding {' and '.join(VIDEO_README)} once each")
    kind = "_video" if video else ""
    questions = export(args.questions_dir or Path(f"results/digits_vlm{kind}_questions"),
                       {f: args.per_family for f in args.families})
    out = args.out or Path(f"results/sweep_vlm{kind}")
    limit = train_vlm.MAX_NEW_TOKENS_VIDEO if video else train_vlm.MAX_NEW_TOKENS
    defaults = ["--out", str(out), "--batch-size", "100", "--max-new-tokens", str(limit)]
    if video and "--specs" not in rest and "--reducers" not in rest:
        defaults += ["--specs", VIDEO_SPECS]
    if args.readme is not None and not video:
        defaults += ["--readme", str(args.readme)]
    import torch

    torch.set_num_threads(args.threads)
    status = tokred_main(["sweep", "--model", str(args.checkpoint), "--questions", str(questions), *defaults, *rest])
    if status == 0 and video:
        video_report(out, questions)
        if args.readme is not None:
            update_video_readme(args.readme, out)
    return status


def video_report(out: Path, questions: Path) -> None:
    """Rewrite the video sweep in ``out`` (JSON, table, plot): a reducer run with kept positions is its own
    line (``divprune (kept positions)``), and the ``frames`` answers are also scored on the cells that hold
    a digit (``frames: digit cells``; most cells are empty, so writing ``empty`` everywhere scores high per
    cell and 0 there), with agreement = the digit cells where the answer equals the unreduced one."""
    from tokred.cli import vlm_sweep

    path = out / vlm_sweep.JSON_NAME
    report = json.loads(path.read_text())
    records = [json.loads(line) for line in questions.read_text().splitlines()]
    if len(records) != report["questions"]:
        raise ValueError(f"{path} answers {report['questions']} questions, {questions} holds {len(records)}")
    clips = {}
    for index, record in enumerate(records):
        if record["family"] == "frames":
            clips[index] = vlm_data.clip("test", "frames", len(clips))
            if clips[index].answer != record["answer"]:
                raise ValueError(f"{questions} line {index + 1} is not test clip {len(clips) - 1} of vlm_data")
    name = "frames: digit cells"
    full = report["results"][0]["answers"]
    for row in report["results"]:
        if "positions=keep" in row["spec"] and not row["family"].endswith("(kept positions)"):
            row["family"] += " (kept positions)"
        if clips and name not in row["families"]:
            counts = [digit_cells(ex, row["answers"][i], full[i]) for i, ex in clips.items()]
            correct, agreed, digits = (sum(c[k] for c in counts) for k in range(3))
            row["families"][name] = {"n": len(clips), "accuracy": correct / digits,
                                     "ci95": vlm_sweep.wilson(correct, digits), "agreement": agreed / digits}
    if clips and name not in report["families"]:
        report["families"].append(name)
    path.write_text(json.dumps(report, indent=2) + "\n")
    markdown = out / vlm_sweep.MARKDOWN_NAME
    header = markdown.read_text().split("\n\n")[0]
    markdown.write_text(f"{header}\n\n{vlm_sweep.format_markdown(report)}\n")
    vlm_sweep.plot(report, out / vlm_sweep.PLOT_NAME, f"{Path(report['settings']['model']).name}: accuracy vs "
                   f"prefill FLOPs ({report['questions']} clips)")
    print(f"rewrote {path}, {markdown} and {out / vlm_sweep.PLOT_NAME}")


def digit_cells(ex, answer: str, unreduced: str) -> tuple[int, int, int]:
    """Of the cells of clip ``ex`` that hold a digit: how many ``answer`` reads right, how many it reads as
    the ``unreduced`` answer does (a cell missing from both agrees), and how many there are."""
    truth = ex.answer.split()

    def cells(text):   # the description's words, cut or padded with None to the clip's cells
        words = vlm_data.parse(text)[0][:len(truth)]
        return words + [None] * (len(truth) - len(words))

    digits = [(a, b, t) for a, b, t in zip(cells(answer), cells(unreduced), truth) if t != vlm_data.EMPTY]
    return sum(a == t for a, _, t in digits), sum(a == b for a, b, _ in digits), len(digits)


def update_video_readme(readme: Path, out: Path) -> None:
    """Put the video sweep in ``out`` (its table, its plot as docs/sweep_vlm_video.png) into ``readme``."""
    from tokred.cli import sweep, vlm_sweep

    report = json.loads((out / vlm_sweep.JSON_NAME).read_text())
    sweep.publish(readme, vlm_sweep.format_markdown(report), out / vlm_sweep.PLOT_NAME, image=VIDEO_IMAGE,
                  markers=VIDEO_README, alt="prefill FLOPs ratio versus accuracy on the video clips, one line per reducer")


if __name__ == "__main__":
    sys.exit(main())
