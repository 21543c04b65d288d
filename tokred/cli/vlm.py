"""tokred bench on a Hugging Face vision-language checkpoint (a folder with config.json).

The model loads with transformers' AutoModelForImageTextToText and AutoProcessor, offline
(local_files_only). Every reducer setting answers the same few generated prompts about one image
(greedy decoding; --prompts FILE gives questions of your own, one per line); the report gives, per setting, the tokens entering the language model's last
layer, the analytic prefill FLOPs (vision tower + projector + language-model prefill, tokred.flops)
and their ratio to the full model, and the agreement of the answers with the full model's
(whole answer identical, and first generated token identical). No timing: for speed, run
evals/bench_vlm.py.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

#: the questions asked about the image by default, one prompt each (--limit takes the first ones;
#: --prompts FILE replaces them)
QUESTIONS = ("What is in the picture?", "Describe the image.", "How many objects are there?",
             "What colour is the background?", "Is there any text in the image?", "Where is the largest object?")
DEFAULT_REDUCERS = "none,divprune:keep=0.5,divprune:keep=0.25,fastv:keep=0.25"
MAX_NEW_TOKENS = 16


def is_checkpoint(model: str | None) -> bool:
    """Whether ``--model`` names a Hugging Face checkpoint folder (holding config.json), not a timm name."""
    return model is not None and (Path(model) / "config.json").is_file()


def load(path: Path):
    """(model, processor) from a local checkpoint folder."""
    from tokred.cli import require

    require("transformers", "a Hugging Face checkpoint as --model")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).eval()
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, KeyError) as error:
        raise ValueError(f"{path} does not load as an image-text-to-text model with its processor "
                         f"(AutoModelForImageTextToText / AutoProcessor): {error}") from None
    return model, processor


def prompts(processor, questions) -> list[str]:
    """The processor's chat template around an image and each question, or LLaVA-1.5's format."""
    if getattr(processor, "chat_template", None):
        return [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                          {"type": "text", "text": q}]}],
                                              add_generation_prompt=True) for q in questions]
    image_token = getattr(processor, "image_token", None) or "<image>"
    return [f"USER: {image_token}\n{q} ASSISTANT:" for q in questions]


def picture(model, path: Path):
    """The image, RGB, resized to the vision tower's input size when the config fixes one."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
    size = getattr(getattr(model.config, "vision_config", None), "image_size", None)
    if isinstance(size, int) and image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return image


def run(model, processor, image, texts: list[str], settings, max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """Answers, prefill FLOPs and tokens of every setting ([(label, reducers)], ``none`` first or not)."""
    import torch

    import tokred

    inputs = [processor(images=[image], text=[text], return_tensors="pt") for text in texts]
    rows = []
    for label, reducers in [("full", ())] + list(settings):
        answers, first, flops, llm_tokens, notes = [], [], [], [], []
        with tokred.applied(model, *reducers), torch.inference_mode():  # errors (wrong stage) surface here
            for batch in inputs:
                model(**batch)
                trace = tokred.last_trace(model)
                flops.append(tokred.flops(model).total)
                llm = trace.tokens("llm")
                llm_tokens.append(llm[-1] if llm else None)
                notes = list(dict.fromkeys(notes + trace.notes))
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
                generated = out[0, batch["input_ids"].shape[1]:]
                answers.append(generated.tolist())
                first.append(generated[:1].tolist())
        rows.append({"reducer": label, "reducer_repr": ", ".join(map(repr, reducers)) or None,
                     "answers_ids": answers, "first": first, "flops": flops,
                     "answers": [processor.decode(a, skip_special_tokens=True) for a in answers],
                     "llm_tokens_last_layer": None if None in llm_tokens else statistics.mean(llm_tokens),
                     "notes": notes})
    full = rows[0]
    results = []
    for row in rows:
        gflops = statistics.mean(row["flops"]) / 1e9
        results.append({
            "reducer": row["reducer"], "reducer_repr": row["reducer_repr"],
            "llm_tokens_last_layer": row["llm_tokens_last_layer"],
            "prefill_gflops": gflops, "flops_ratio": gflops / (statistics.mean(full["flops"]) / 1e9),
            "answer_agreement": statistics.mean(a == b for a, b in zip(row["answers_ids"], full["answers_ids"])),
            "first_token_agreement": statistics.mean(a == b for a, b in zip(row["first"], full["first"])),
            "answers": row["answers"], "notes": row["notes"]})
    return {"full": results[0], "results": results[1:], "prompts": texts}


def format_table(report: dict) -> str:
    from tokred.cli import tables

    rows = [[row["reducer"], "n/a" if row["llm_tokens_last_layer"] is None else f"{row['llm_tokens_last_layer']:g}",
             f"{row['prefill_gflops']:.4f}", f"{row['flops_ratio']:.3f}", tables.percent(row["answer_agreement"]),
             tables.percent(row["first_token_agreement"])] for row in report["results"]]
    return tables.markdown(rows, ["reducer", "tokens at last LLM layer", "prefill GFLOPs", "FLOPs ratio",
                                  "answers agree", "first token agrees"])


def main(args, parse_reducers) -> int:
    """``tokred bench --model <checkpoint folder>``."""
    from tokred.cli import bench

    if args.data is not None or args.pretrained:
        raise ValueError("--data and --pretrained are for timm models; a checkpoint folder is loaded as it is "
                         "and asked generated prompts about --image")
    questions = QUESTIONS
    if args.prompts is not None:
        if not args.prompts.is_file():
            raise FileNotFoundError(f"--prompts {args.prompts} not found")
        questions = tuple(line.strip() for line in args.prompts.read_text().splitlines() if line.strip())
        if not questions:
            raise ValueError(f"--prompts {args.prompts} holds no questions (one per line)")
    count = len(questions) if args.limit is None else min(args.limit, len(questions))
    max_new_tokens = MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    settings = parse_reducers(args.reducers or DEFAULT_REDUCERS)
    model, processor = load(Path(args.model))
    from tokred.reference import assets_dir

    image_path = args.image or assets_dir() / "sample.jpg"
    if not Path(image_path).is_file():
        raise FileNotFoundError(f"image {image_path} not found")
    texts = prompts(processor, questions[:count])
    report = run(model, processor, picture(model, image_path), texts,
                 [(label, reducers) for label, reducers in settings], max_new_tokens=max_new_tokens)
    report["settings"] = {"model": str(args.model), "model_class": type(model).__name__, "image": str(image_path),
                          "max_new_tokens": max_new_tokens, "reducers": [label for label, _ in settings]}
    report["versions"] = bench.versions()
    print(f"{args.model} ({type(model).__name__}) on {count} generated prompts about {image_path}; greedy "
          f"answers of up to {max_new_tokens} tokens; FLOPs = analytic prefill FLOPs reduced / full (no timing)")
    print(format_table(report))
    for row in report["results"]:
        for note in row["notes"][:3]:
            print(f"  {row['reducer']}: {note}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_vlm.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0
