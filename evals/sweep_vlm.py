"""Accuracy versus prefill FLOPs of the vision-language reducers on the shipped digits VLM.

Writes the test split of ``evals/vlm_data.py`` as a question file (PNG scenes + ``questions.jsonl``,
the format ``tokred sweep --help`` documents) and runs ``tokred sweep`` on it: every reducer of the
default VLM sweep at 1/2, 1/4, 1/8 and 1/16 of the 64 visual tokens, greedy answers, accuracy per
question family with a 95% Wilson interval (``describe``: per cell, scored word by word; the interval
over cells, which are not independent within an image, is too narrow there), agreement with the
unreduced model, prefill FLOPs and time-to-first-token ratios.

A video checkpoint (``LlavaOnevisionForConditionalGeneration``, ``evals/train_vlm.py --video``) is
swept on the clip families (``vlm_data.VIDEO_FAMILIES``): each clip is written as its frames' PNGs
(a ``frames`` record), ``frames`` scored word by word, budgets relative to its 128 frame tokens.

Usage: python evals/sweep_vlm.py [--per-family 2000] [--families describe ...] [tokred sweep options]
  e.g. python evals/sweep_vlm.py --readme            (the README's table and docs/sweep_vlm.png)
       python evals/sweep_vlm.py --per-family 100 --keeps 0.25,0.125
       python evals/sweep_vlm.py --export assets/digits_vlm --slice   (the question file the checkpoint ships)
Options it does not know go to ``tokred sweep`` (``--out``, ``--reducers``, ``--specs``, ``--keeps``, ``--readme``...).
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=assets_dir() / "digits_vlm")
    p.add_argument("--per-family", type=int, default=2000)
    p.add_argument("--families", nargs="+", default=None, choices=vlm_data.FAMILIES + vlm_data.VIDEO_FAMILIES,
                   help="default: every family of the checkpoint's kind (scenes, or clips for a OneVision checkpoint)")
    p.add_argument("--questions-dir", type=Path, default=Path("results/digits_vlm_questions"),
                   help="where the test split is written as a question file")
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
    questions = export(args.questions_dir, {f: args.per_family for f in args.families})
    limit = train_vlm.MAX_NEW_TOKENS_VIDEO if video else train_vlm.MAX_NEW_TOKENS
    defaults = ["--out", "results/sweep_vlm_video" if video else "results/sweep_vlm", "--batch-size", "100",
                "--max-new-tokens", str(limit)]
    import torch

    torch.set_num_threads(args.threads)
    return tokred_main(["sweep", "--model", str(args.checkpoint), "--questions", str(questions), *defaults, *rest])


if __name__ == "__main__":
    sys.exit(main())
