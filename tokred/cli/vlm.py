"""tokred bench on a Hugging Face vision-language checkpoint (a folder with config.json).

The model loads with transformers' AutoModelForImageTextToText and AutoProcessor, offline
(local_files_only), on --device. Every reducer setting answers the same prompts, each run alone
(greedy decoding): the folder's questions.jsonl when it ships one and --image is not given (the
first --limit questions of each family, default 2), else generic questions about --image (default:
the sample photo), or --prompts FILE, one per line (a line holding the processor's image token is
used as written, others go into the processor's chat template). The prompts used are printed. The
report gives, per setting, the tokens entering the language model's last layer, the analytic
prefill FLOPs (vision tower + projector + language-model prefill, tokred.flops) and their ratio to
the full model, the prefill time ratio (the first prompt, --rounds interleaved rounds with
--threads CPU threads) and the agreement of the answers with the full model's (whole answer
identical, and first generated token identical). For a fuller speed study, run evals/bench_vlm.py.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

#: the questions asked about --image for a folder without questions.jsonl, one prompt each (--limit takes
#: the first ones; --prompts FILE replaces them)
QUESTIONS = ("What is in the picture?", "Describe the image.", "How many objects are there?",
             "What colour is the background?", "Is there any text in the image?", "Where is the largest object?")
DEFAULT_REDUCERS = "none,divprune:keep=0.5,divprune:keep=0.25,fastv:keep=0.25"
#: questions per question family taken from a checkpoint folder's questions.jsonl (--limit sets it)
PER_FAMILY = 2
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

    from tokred.cli import checks

    image = checks.image(path)
    size = getattr(getattr(model.config, "vision_config", None), "image_size", None)
    if isinstance(size, int) and image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return image


def run(model, processor, questions, settings, max_new_tokens: int = MAX_NEW_TOKENS, rounds: int = 0,
        threads: int | None = None, clock: str = "wall") -> dict:
    """Answers, prefill FLOPs and tokens of every setting ([(label, reducers)]) on ``questions``
    (:class:`tokred.cli.vlm_sweep.Question`, each run alone on the model's device), and with ``rounds``
    the median prefill time of the first question per setting (interleaved rounds, ``threads`` CPU threads)."""
    import torch

    import tokred
    from tokred.cli import bench, vlm_sweep

    inputs = [vlm_sweep.model_inputs(processor, [q], model.device) for q in questions]
    settings = [("full", ())] + list(settings)
    seconds = [None] * len(settings)
    if rounds:
        with bench._timing_conditions(threads):
            threads = torch.get_num_threads()
            seconds = vlm_sweep.prefill_seconds(model, inputs[0], settings, rounds, clock=bench.CLOCKS[clock])
    rows = []
    for label, reducers in settings:
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
    for row, prefill in zip(rows, seconds):
        gflops = statistics.mean(row["flops"]) / 1e9
        results.append({
            "reducer": row["reducer"], "reducer_repr": row["reducer_repr"],
            "llm_tokens_last_layer": row["llm_tokens_last_layer"],
            "prefill_gflops": gflops, "flops_ratio": gflops / (statistics.mean(full["flops"]) / 1e9),
            "prefill_seconds": prefill, "prefill_time_ratio": None if prefill is None else prefill / seconds[0],
            "answer_agreement": statistics.mean(a == b for a, b in zip(row["answers_ids"], full["answers_ids"])),
            "first_token_agreement": statistics.mean(a == b for a, b in zip(row["first"], full["first"])),
            "answers": row["answers"], "notes": row["notes"]})
    texts = [vlm_sweep.prompt_text(processor, q) for q in questions]
    timing = {"rounds": rounds, "threads": threads, "clock": clock, "device": str(model.device),
              "statistic": "median prefill time of the first prompt over interleaved rounds, reduced / full"}
    return {"full": results[0], "results": results[1:], "prompts": texts, "timing": timing}


def format_table(report: dict) -> str:
    from tokred.cli import tables

    rows = [[row["reducer"], "n/a" if row["llm_tokens_last_layer"] is None else f"{row['llm_tokens_last_layer']:g}",
             f"{row['prefill_gflops']:.4f}", f"{row['flops_ratio']:.3f}",
             "n/a" if row["prefill_time_ratio"] is None else f"{row['prefill_time_ratio']:.2f}",
             tables.percent(row["answer_agreement"]),
             tables.percent(row["first_token_agreement"])] for row in report["results"]]
    return tables.markdown(rows, ["reducer", "tokens at last LLM layer", "prefill GFLOPs", "FLOPs ratio",
                                  "prefill time ratio", "answers agree", "first token agrees"])


def questions_of(args, processor, image):
    """(questions, where they came from) for ``tokred bench --model DIR``: the lines of ``--prompts``
    (as written when they hold the processor's image token, else as questions), else the folder's
    questions.jsonl unless ``--image`` is given (``--limit`` per family, default
    :data:`PER_FAMILY`), else :data:`QUESTIONS`; ``image`` is the picture they ask about."""
    from tokred.cli.vlm_sweep import Question, per_family, read_questions

    token = getattr(processor, "image_token", None) or "<image>"
    if args.prompts is not None:
        lines = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
        source = f"the lines of {args.prompts} (as written when they hold {token}, else as questions)"
    elif args.image is None and (Path(args.model) / "questions.jsonl").is_file():
        path = Path(args.model) / "questions.jsonl"
        limit = PER_FAMILY if args.limit is None else args.limit
        return per_family(read_questions(path), limit), f"{path}, the first {limit} of each question family"
    else:
        lines, source = list(QUESTIONS), "the generic questions tokred.cli.vlm.QUESTIONS"
    lines = lines[:args.limit]
    return [Question(answer="", prompt=line, images=(image,)) if token in line else
            Question(answer="", question=line, images=(image,)) for line in lines], source


def main(args, parse_reducers) -> int:
    """``tokred bench --model <checkpoint folder>``."""
    from tokred.cli import bench, checks

    if args.data is not None or args.pretrained:
        raise ValueError("--data and --pretrained are for timm models; a checkpoint folder is loaded as it is "
                         "and asked generated prompts about --image")
    if args.prompts is not None and not args.prompts.is_file():
        raise FileNotFoundError(f"--prompts {args.prompts} not found")
    if args.prompts is not None and not args.prompts.read_text().strip():
        raise ValueError(f"--prompts {args.prompts} holds no questions (one per line)")
    max_new_tokens = MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    from tokred.reference import assets_dir

    image_path = args.image or assets_dir() / "sample.jpg"
    checks.image(image_path)
    device = checks.device(args.device)
    threads = args.threads or None
    clock = bench.resolve_clock(args.clock, threads, device)
    settings = parse_reducers(args.reducers or DEFAULT_REDUCERS)
    model, processor = load(Path(args.model))
    model.to(device)
    questions, source = questions_of(args, processor, picture(model, image_path))
    report = run(model, processor, questions, settings, max_new_tokens=max_new_tokens, rounds=args.rounds,
                 threads=threads, clock=clock)
    report["settings"] = {"model": str(args.model), "model_class": type(model).__name__, "prompts_from": source,
                          "image": None if isinstance(questions[0].images[0], Path) else str(image_path),
                          "max_new_tokens": max_new_tokens, "reducers": [label for label, _ in settings],
                          "device": str(device), "rounds": args.rounds, "threads": report["timing"]["threads"]}
    report["versions"] = bench.versions()
    print(f"{args.model} ({type(model).__name__}) on {len(questions)} prompts from {source}:")
    for text in dict.fromkeys(report["prompts"]):
        print(f"  prompt: {text!r}")
    threads_text = f"{report['timing']['threads']} thread" + ("s" if report["timing"]["threads"] != 1 else "")
    print(f"greedy answers of up to {max_new_tokens} tokens; FLOPs = analytic prefill FLOPs reduced / full; "
          f"prefill time = median over {args.rounds} interleaved rounds of the first prompt's prefill "
          f"({report['timing']['clock']} clock, {threads_text}, {device}), reduced / full")
    print(format_table(report))
    for row in report["results"]:
        for note in row["notes"][:3]:
            print(f"  {row['reducer']}: {note}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_vlm.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0
