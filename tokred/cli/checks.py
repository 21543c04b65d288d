"""Checks of the options several commands share (``--device``, ``--model``, ``--image``): each raises a
one-line :class:`ValueError` saying what was wrong and what is allowed (:func:`tokred.cli.main` prints
it as ``tokred <command>: error: ...``), before any model loads."""
from __future__ import annotations

from pathlib import Path


def device(text: str):
    """``--device`` as a :class:`torch.device` that this machine has (a tensor is made on it)."""
    import torch

    try:
        chosen = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text}: not a torch device; use e.g. cpu, cuda, cuda:1 or mps") from None
    try:
        torch.empty(0, device=chosen)
    except (RuntimeError, AssertionError) as error:  # torch without CUDA raises AssertionError
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"--device {text} is not available on this machine ({first}); use --device cpu") from None
    return chosen


def looks_like_path(name: str) -> bool:
    """Whether ``--model`` is meant as a folder: it holds a path separator and no timm source prefix
    (``hf-hub:``, ``local-dir:``), or starts with ``.`` or ``~``; timm names hold neither."""
    return name.startswith((".", "~")) or (":" not in name and ("/" in name or "\\" in name))


def model(name: str | None) -> None:
    """Refuse a ``--model`` meant as a folder that does not exist or is no Hugging Face checkpoint
    (a folder with config.json); None (the reference model), checkpoints and timm names pass."""
    if name is None or (Path(name).expanduser() / "config.json").is_file():
        return
    if Path(name).expanduser().is_dir():
        raise ValueError(f"--model {name}: not a timm model name, and not a Hugging Face checkpoint folder "
                         "(a folder with config.json)")
    if looks_like_path(name):
        raise ValueError(f"--model {name}: no such folder (give a Hugging Face checkpoint folder, or a timm model "
                         "name such as vit_small_patch16_224)")


def timm_model(name: str, pretrained: bool = False):
    """``timm.create_model(name, pretrained=pretrained)`` in eval mode, with a clear error for a name timm
    does not know."""
    import timm

    model(name)
    try:
        return timm.create_model(name, pretrained=pretrained).eval()
    except RuntimeError as error:
        if not str(error).startswith("Unknown model"):
            raise
        raise ValueError(f"--model {name}: timm has no such model (timm.list_models('*vit*') lists its ViTs)") from None


def image(path: Path, mode: str = "RGB", option: str = "--image"):
    """The image at ``path`` converted to ``mode``, with a clear error when it is missing or not an image."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"{option} {path} not found")
    try:
        with Image.open(path) as picture:
            return picture.convert(mode)
    except UnidentifiedImageError:
        raise ValueError(f"{option} {path} is not an image that PIL can read (e.g. PNG or JPEG)") from None
