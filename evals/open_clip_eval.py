"""Zero-shot classification and image-text retrieval of an open_clip model with tokred reducers.

For every reducer spec (parsed by ``tokred.cli.bench.parse_reducers``) the image tower runs on the
same batches as the unreduced model, and the script reports image-tower tokens, analytic GFLOPs
per image and the FLOPs ratio against the unreduced tower, zero-shot top-1 and agreement with
the unreduced model's predictions, and retrieval recall@1/5 (both directions) with agreement of
the top-1 retrieved item. Text features come from the text tower once (tokred never touches it);
FLOPs are the image tower's (patch embedding, blocks, reducer overhead, pooling and projection).

    # zero-shot on an ImageFolder: ImageNet's val folder (1000 synset folders n01440764, ...) gets
    # open_clip's ImageNet class names; any other folder dataset its folder names
    python evals/open_clip_eval.py --model ViT-B-32 --pretrained laion2b_s34b_b79k \\
        --data ~/data/imagenet/val --reducers none,tome:r=4,tome:r=8,pitome:keep=0.9
    # retrieval on a tab-separated file of "image path<TAB>caption" lines (paths relative to it)
    python evals/open_clip_eval.py --model ViT-B-16 --pretrained openai --retrieval captions.tsv
    # a tiny random model on random images: runs offline in seconds (smoke test)
    python evals/open_clip_eval.py --tiny

Zero-shot classifiers come from open_clip itself: ``open_clip.build_zero_shot_classifier`` over the
class names and prompt templates (by default ``open_clip.OPENAI_IMAGENET_TEMPLATES``, the 80 prompts
of the CLIP paper; ``--templates simple`` for ``SIMPLE_IMAGENET_TEMPLATES``, ``--template`` for one
prompt of your own), with the class names of ``open_clip.IMAGENET_CLASSNAMES`` for ImageNet.

Weights: ``--pretrained`` is an open_clip pretrained tag (``open_clip.list_pretrained()``) or the
path of a local checkpoint file. Nothing is downloaded unless ``--allow-download`` is given: the
script sets ``HF_HUB_OFFLINE=1`` before importing open_clip, so tags only load when their weights
are already in the Hugging Face / open_clip cache (``--cache-dir``). Without ``--pretrained`` the
model has random weights (numbers then only show agreement and FLOPs, not accuracy).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

DEFAULT_REDUCERS = "none,tome:r=4,tome:r=8,pitome:keep=0.9"
#: ImageNet's class folders: 1000 WordNet synset ids (sorted, they are the class indices of open_clip's names)
IMAGENET_SYNSET = re.compile(r"n\d{8}")
TINY_CLASSES = ["cat", "dog", "car", "tree"]


# models and data ------------------------------------------------------------------------------------
def tiny_model():
    """A seeded random CLIP: 32x32 images, 4x4 patches, 3 blocks, and a word-hash tokenizer."""
    from open_clip.model import CLIP

    torch.manual_seed(0)
    context, vocab = 16, 1000
    model = CLIP(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=4, width=48, layers=3, head_width=16),
                 text_cfg=dict(context_length=context, vocab_size=vocab, width=32, heads=2, layers=1)).eval()

    def tokenize(texts: list[str]) -> Tensor:
        tokens = torch.zeros(len(texts), context, dtype=torch.long)
        for row, text in enumerate(texts):
            words = [1 + zlib.crc32(word.encode()) % (vocab - 2) for word in text.lower().split()]
            ids = words[:context - 1] + [vocab - 1]  # the last id marks the end (argmax pooling)
            tokens[row, :len(ids)] = torch.tensor(ids)
        return tokens

    from torchvision import transforms

    preprocess = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor(),
                                     transforms.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))])
    return model, preprocess, tokenize


def load_model(args):
    """(model, image transform, tokenizer) for ``args.model`` / ``args.pretrained``."""
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            args.model, pretrained=args.pretrained, device=args.device, cache_dir=args.cache_dir)
        tokenizer = open_clip.get_tokenizer(args.model, cache_dir=args.cache_dir)
    except Exception as error:  # missing weights surface as many different hub / file errors
        if args.pretrained and not args.allow_download:
            raise RuntimeError(f"could not load {args.model} with pretrained={args.pretrained!r} offline ({error}); "
                               "its weights must be in the local cache or given as a checkpoint path, or pass "
                               "--allow-download") from error
        raise
    return model.eval(), preprocess, tokenizer


@dataclass
class Task:
    """Images (batches of tensors), the texts to compare them with, and the ground truth.

    Zero-shot: ``texts`` are the class names (the classifier averages ``templates`` over each) and
    ``targets[i]`` the class of image i. Retrieval: ``texts`` are captions, ``caption_image[j]`` the
    image of caption j.
    """

    name: str
    batches: object  # iterable of (images, targets)
    texts: list[str]
    templates: list | None = None
    targets: Tensor | None = None
    caption_image: Tensor | None = None
    num_images: int = 0


def _subset(dataset, limit):
    if limit is None or limit >= len(dataset):
        return dataset
    generator = torch.Generator().manual_seed(0)
    indices = torch.randperm(len(dataset), generator=generator)[:limit].sort().values.tolist()
    return torch.utils.data.Subset(dataset, indices)


def is_imagenet(folders: list[str]) -> bool:
    """Whether ImageFolder classes are ImageNet-1k's: 1000 synset-id folders (their sorted order is
    the class order of ``open_clip.IMAGENET_CLASSNAMES``)."""
    return len(folders) == 1000 and all(IMAGENET_SYNSET.fullmatch(name) for name in folders)


def class_names(folders: list[str], choice: str = "auto") -> list[str]:
    """Zero-shot class names for ImageFolder ``folders``: open_clip's ImageNet names (``imagenet``;
    ``auto`` when the folders are ImageNet's synsets), else the folder names with ``_`` as spaces."""
    from open_clip import IMAGENET_CLASSNAMES

    if choice == "imagenet" or (choice == "auto" and is_imagenet(folders)):
        if len(folders) != len(IMAGENET_CLASSNAMES):
            raise ValueError(f"--classnames imagenet needs ImageNet-1k's {len(IMAGENET_CLASSNAMES)} class folders, "
                             f"got {len(folders)}")
        return list(IMAGENET_CLASSNAMES)
    return [name.replace("_", " ") for name in folders]


def templates(args) -> list:
    """The prompt templates: ``--template`` alone, else open_clip's OpenAI or simple ImageNet set."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    if args.template is not None:
        return [args.template]
    return list(OPENAI_IMAGENET_TEMPLATES if args.templates == "openai" else SIMPLE_IMAGENET_TEMPLATES)


def zero_shot_task(args, preprocess) -> Task:
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(args.data), transform=preprocess)
    if len(dataset) == 0:
        raise ValueError(f"no images found in {args.data}")
    classes = class_names(dataset.classes, args.classnames)
    dataset = _subset(dataset, args.limit)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    return Task("zero_shot", loader, classes, templates=templates(args), num_images=len(dataset))


class _CaptionImages(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            return self.preprocess(image.convert("RGB")), index


def retrieval_task(args, preprocess) -> Task:
    """Lines ``image<TAB>caption``; an image may have several captions (one line each)."""
    root = args.retrieval.parent
    images: dict[Path, int] = {}
    captions, caption_image = [], []
    for number, line in enumerate(args.retrieval.read_text().splitlines(), 1):
        if not line.strip():
            continue
        path, sep, caption = line.partition("\t")
        if not sep or not caption.strip():
            raise ValueError(f"{args.retrieval}:{number}: expected 'image path<TAB>caption'")
        path = (root / path.strip()).resolve()
        if path not in images:
            if args.limit is not None and len(images) >= args.limit:
                continue
            images[path] = len(images)
        captions.append(caption.strip())
        caption_image.append(images[path])
    if not images:
        raise ValueError(f"no image-caption pairs in {args.retrieval}")
    dataset = _CaptionImages(list(images), preprocess)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    return Task("retrieval", loader, captions, caption_image=torch.tensor(caption_image), num_images=len(images))


def tiny_tasks(args) -> list[Task]:
    """Random images: random class labels for zero-shot, one made-up caption each for retrieval."""
    count = args.limit or 24
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(count, 3, 32, 32, generator=generator)
    labels = torch.randint(0, len(TINY_CLASSES), (count,), generator=generator)
    batches = [(images[i:i + args.batch_size], labels[i:i + args.batch_size]) for i in range(0, count, args.batch_size)]
    captions = [f"a photo of a {TINY_CLASSES[int(label)]} number {i}" for i, label in enumerate(labels)]
    return [Task("zero_shot", batches, list(TINY_CLASSES), templates=templates(args), num_images=count),
            Task("retrieval", batches, captions, caption_image=torch.arange(count), num_images=count)]


# evaluation -----------------------------------------------------------------------------------------
@dataclass
class Setting:
    label: str
    reducers: tuple
    features: dict[str, list[Tensor]] = field(default_factory=dict)
    flops: int = 0
    images: int = 0
    final_tokens: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@torch.inference_mode()
def encode_texts(model, tokenizer, texts: list[str], device, batch_size: int) -> Tensor:
    """Normalised text features (len(texts), dim) of captions."""
    chunks = [model.encode_text(tokenizer(texts[i:i + batch_size]).to(device), normalize=True)
              for i in range(0, len(texts), batch_size)]
    return torch.cat(chunks).float().cpu()


@torch.inference_mode()
def encode_images(model, task: Task, settings: list[Setting], device, progress: bool) -> Tensor | None:
    """Image features of every setting (and of the unreduced model, ``settings[0]``); the targets."""
    import tokred
    from tqdm import tqdm

    targets = []
    try:
        for images, target in tqdm(task.batches, desc=task.name, unit="batch", disable=not progress,
                                   file=sys.stdout):
            images = images.to(device)
            targets.append(target)
            for setting in settings:  # one model: each setting's reducers are applied before its forward
                tokred.apply(model, *setting.reducers)
                features = model.encode_image(images, normalize=True)
                trace = tokred.last_trace(model)
                setting.features.setdefault(task.name, []).append(features.float().cpu())
                setting.flops += tokred.flops(model).total
                setting.images += images.shape[0]
                setting.final_tokens.append(trace.final_tokens)
                setting.notes = list(dict.fromkeys(setting.notes + trace.notes))
    finally:
        tokred.remove(model)
    return torch.cat(targets) if task.name == "zero_shot" else None


def _recall(ranks: Tensor, k: int) -> float:
    return float((ranks < k).float().mean())


def zero_shot_metrics(logits: Tensor, full_logits: Tensor, targets: Tensor) -> dict:
    prediction = logits.argmax(dim=-1)
    top5 = logits.topk(min(5, logits.shape[1]), dim=-1).indices
    return {"top1": float((prediction == targets).float().mean()),
            "top5": float((top5 == targets[:, None]).any(dim=-1).float().mean()),
            "agreement": float((prediction == full_logits.argmax(dim=-1)).float().mean()),
            "num_images": int(len(targets))}


def retrieval_metrics(similarity: Tensor, full_similarity: Tensor, caption_image: Tensor) -> dict:
    """similarity: (images, captions). Image->text: rank of the best-ranked own caption."""
    num_images = similarity.shape[0]
    own = caption_image[None, :] == torch.arange(num_images)[:, None]  # (images, captions)
    order = similarity.argsort(dim=1, descending=True, stable=True)
    image_ranks = own.gather(1, order).float().argmax(dim=1)  # first position holding an own caption
    text_order = similarity.t().argsort(dim=1, descending=True, stable=True)
    text_ranks = (text_order == caption_image[:, None]).float().argmax(dim=1)
    return {"image_to_text_r1": _recall(image_ranks, 1), "image_to_text_r5": _recall(image_ranks, 5),
            "text_to_image_r1": _recall(text_ranks, 1), "text_to_image_r5": _recall(text_ranks, 5),
            "image_to_text_agreement": float((similarity.argmax(1) == full_similarity.argmax(1)).float().mean()),
            "text_to_image_agreement": float((similarity.argmax(0) == full_similarity.argmax(0)).float().mean()),
            "num_images": num_images, "num_captions": int(len(caption_image))}


def evaluate(model, tokenizer, tasks: list[Task], specs: str, device="cpu", batch_size: int = 64,
             progress: bool = True) -> list[dict]:
    """One result row per reducer spec (``none`` = the unreduced model)."""
    from tokred.cli.bench import parse_reducers

    settings = [Setting("full", ())] + [Setting(label, reducers) for label, reducers in parse_reducers(specs)]
    import tokred

    for setting in settings[1:]:  # unsupported model or bad schedule: fail before any forward
        if setting.reducers:
            with tokred.applied(model, *setting.reducers):
                pass
    rows = {setting.label: {} for setting in settings}
    for task in tasks:
        if task.name == "zero_shot":  # (classes, dim): open_clip's classifier, templates averaged per class
            from open_clip import build_zero_shot_classifier

            text_features = build_zero_shot_classifier(model, tokenizer, task.texts, task.templates,
                                                       device=device).t().float().cpu()
        else:
            text_features = encode_texts(model, tokenizer, task.texts, device, batch_size)
        targets = encode_images(model, task, settings, device, progress)
        full = torch.cat(settings[0].features[task.name]) @ text_features.t()
        for setting in settings[1:]:
            scores = torch.cat(setting.features[task.name]) @ text_features.t()
            if task.name == "zero_shot":
                rows[setting.label]["zero_shot"] = zero_shot_metrics(scores, full, targets)
            else:
                rows[setting.label]["retrieval"] = retrieval_metrics(scores, full, task.caption_image)
    full_flops = settings[0].flops / settings[0].images
    results = []
    for setting in settings[1:]:
        flops = setting.flops / setting.images
        final = sorted(set(setting.final_tokens))
        results.append({
            "reducer": setting.label,
            "reducer_repr": ", ".join(map(repr, setting.reducers)) or None,
            "tokens_final": final[0] if len(final) == 1 else statistics.mean(setting.final_tokens),
            "gflops_per_image": flops / 1e9,
            "flops_ratio": flops / full_flops,
            "zero_shot": rows[setting.label].get("zero_shot"),
            "retrieval": rows[setting.label].get("retrieval"),
            "notes": setting.notes,
        })
    return results


def format_table(results: list[dict]) -> str:
    """One Markdown row per reducer spec (:func:`tokred.cli.tables.markdown`)."""
    from tokred.cli.tables import markdown, percent

    rows = []
    for row in results:
        zs, rt = row["zero_shot"] or {}, row["retrieval"] or {}
        rows.append([row["reducer"], f"{row['tokens_final']:g}", f"{row['gflops_per_image']:.4f}",
                     f"{row['flops_ratio']:.3f}", percent(zs.get("top1")), percent(zs.get("agreement")),
                     percent(rt.get("image_to_text_r1")), percent(rt.get("text_to_image_r1")),
                     percent(rt.get("image_to_text_agreement"))])
    return markdown(rows, ["reducer", "tokens", "GFLOPs/img", "FLOPs ratio", "zs top-1", "zs agree", "i2t R@1",
                           "t2i R@1", "i2t agree"])


# command line ---------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (default ViT-B-32)")
    parser.add_argument("--pretrained", default=None,
                        help="open_clip pretrained tag or checkpoint path (from the local cache unless "
                             "--allow-download); without it the weights are random")
    parser.add_argument("--allow-download", action="store_true", help="let open_clip download missing weights")
    parser.add_argument("--cache-dir", default=None, help="open_clip / Hugging Face cache directory")
    parser.add_argument("--data", type=Path, default=None, help="ImageFolder for zero-shot classification")
    parser.add_argument("--retrieval", type=Path, default=None,
                        help="text file of 'image path<TAB>caption' lines for image-text retrieval")
    parser.add_argument("--classnames", choices=["auto", "imagenet", "folders"], default="auto",
                        help="zero-shot class names: open_clip's ImageNet names, or the folder names (default auto: "
                             "ImageNet's when --data has its 1000 synset folders n01440764 ..., else the folder names)")
    parser.add_argument("--templates", choices=["openai", "simple"], default="openai",
                        help="open_clip's prompt set: OPENAI_IMAGENET_TEMPLATES (80, default) or "
                             "SIMPLE_IMAGENET_TEMPLATES")
    parser.add_argument("--template", default=None, help="one zero-shot prompt instead, e.g. 'a photo of a {}.'")
    parser.add_argument("--reducers", default=DEFAULT_REDUCERS,
                        help=f"comma-separated reducer specs as in `tokred bench` (default: {DEFAULT_REDUCERS})")
    parser.add_argument("--limit", type=int, default=None, help="maximum number of images per task")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny random CLIP (32x32 inputs) instead of --model, offline; on random images "
                             "unless --data / --retrieval are given")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.template is not None and "{}" not in args.template:
        parser.error("--template needs a '{}' for the class name")
    if not args.tiny and args.data is None and args.retrieval is None:
        parser.error("give --data (zero-shot) and/or --retrieval, or --tiny for the offline smoke run")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.allow_download:  # before huggingface_hub is imported (it reads the variable once)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tokred
    from tokred.cli.bench import parse_reducers

    parse_reducers(args.reducers)  # bad specs fail before the model loads
    notes = []
    if args.tiny:
        model, preprocess, tokenizer = tiny_model()
        model = model.to(args.device)
        described = "tiny random CLIP (3 blocks, 64 patches)"
        notes.append("--tiny: random weights; the numbers only check that everything runs")
    else:
        model, preprocess, tokenizer = load_model(args)
        described = f"{args.model} ({args.pretrained or 'random weights'})"
        if not args.pretrained:
            notes.append("no --pretrained: random weights; only agreement and FLOPs are meaningful")
    tasks = []
    if args.data is not None:
        tasks.append(zero_shot_task(args, preprocess))
    if args.retrieval is not None:
        tasks.append(retrieval_task(args, preprocess))
    if not tasks:  # --tiny alone
        tasks = tiny_tasks(args)
        notes.append("random images, labels and captions")
    for note in notes:
        print(f"note: {note}")
    results = evaluate(model, tokenizer, tasks, args.reducers, device=args.device, batch_size=args.batch_size,
                       progress=not args.no_progress)
    print(f"\n{described}: " + ", ".join(f"{task.name} on {task.num_images} images" for task in tasks))
    print(format_table(results))
    for row in results:
        for note in row["notes"][:2]:
            print(f"  {row['reducer']}: {note}")
    if args.out is not None:
        import open_clip

        report = {"settings": {"model": described, "pretrained": args.pretrained, "data": str(args.data),
                               "retrieval": str(args.retrieval), "classnames": args.classnames,
                               "templates": args.template or args.templates, "limit": args.limit,
                               "batch_size": args.batch_size, "device": str(args.device), "notes": notes},
                  "results": results,
                  "versions": {"tokred": tokred.__version__, "open_clip": open_clip.__version__,
                               "torch": torch.__version__}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (RuntimeError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
