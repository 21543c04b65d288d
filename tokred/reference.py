"""The embedded reference model: a small ViT trained on scikit-learn's handwritten digits.

The checkpoint, its config and the held-out test split live in the repository's ``assets/``
folder (written by ``evals/train_reference.py --out assets``), which installs as the package data
``tokred/assets/`` of a wheel. The preprocessing here is the one the
training script uses, so :func:`load_reference_data` reproduces exactly the tensors that the
recorded test accuracy was measured on.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONFIG_FILE = "reference_vit.json"
WEIGHTS_FILE = "reference_vit.safetensors"
DATA_FILE = "digits_test.npz"
#: side of the square images the reference model sees (the 8x8 digits are upsampled to it)
IMAGE_SIZE = 32
#: the digits' pixel values are integers 0..16
DIGITS_MAX = 16.0


def assets_dir() -> Path:
    """The folder of the demo assets: ``$TOKRED_ASSETS`` if set; else ``tokred/assets/`` of an
    installed wheel (package data); else ``assets/`` at the root of a source checkout (editable
    installs, tests)."""
    override = os.environ.get("TOKRED_ASSETS")
    if override:
        return Path(override)
    here = Path(__file__).resolve().parent
    installed = here / "assets"
    return installed if installed.is_dir() else here.parent / "assets"


def _asset(name: str) -> Path:
    path = assets_dir() / name
    if not path.is_file():
        raise FileNotFoundError(
            f"reference asset {path} is missing. The reference model ships with tokred (the repository's "
            "assets/ folder, installed as tokred/assets/): reinstall tokred, set TOKRED_ASSETS to a folder "
            "holding it, or recreate it with `python evals/train_reference.py --out assets`.")
    return path


def digits_to_unit(raw: np.ndarray | Tensor, size: int = IMAGE_SIZE) -> Tensor:
    """Raw digits (N, 8, 8) with values 0..16 -> float32 (N, 1, size, size) in [0, 1], bilinear upsampling."""
    x = torch.as_tensor(np.asarray(raw), dtype=torch.float32)
    if x.dim() != 3:
        raise ValueError(f"expected raw digits of shape (N, H, W), got {tuple(x.shape)}")
    x = (x / DIGITS_MAX)[:, None]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def normalise(x: Tensor, mean: float, std: float) -> Tensor:
    """(x - mean) / std with the single-channel statistics of the training split."""
    return (x - mean) / std


def preprocess_digits(raw: np.ndarray | Tensor, mean: float, std: float, size: int = IMAGE_SIZE) -> Tensor:
    """The reference model's full input pipeline: scale to [0, 1], upsample, normalise."""
    return normalise(digits_to_unit(raw, size), mean, std)


def load_reference_config() -> dict:
    """The reference model's config: model kwargs, normalisation, split, training, accuracy."""
    return json.loads(_asset(CONFIG_FILE).read_text())


def build_reference_model(config: dict) -> nn.Module:
    """An untrained timm VisionTransformer with the reference architecture."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**config["model_kwargs"])


def load_reference_model() -> nn.Module:
    """The trained reference ViT (timm VisionTransformer, fp32, eval mode)."""
    from safetensors.torch import load_file

    config = load_reference_config()
    model = build_reference_model(config)
    model.load_state_dict(load_file(str(_asset(WEIGHTS_FILE))), strict=True)
    return model.eval()


def digits_split(test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits and the stratified train/test split of the reference model:
    (raw (N, 8, 8) uint8, labels (N,), sorted train indices, sorted test indices)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    raw = digits.images.astype(np.uint8)  # integers 0..16 stored as float64
    if not np.array_equal(raw, digits.images):
        raise ValueError("scikit-learn's digits are expected to be integers 0..16")
    labels = digits.target.astype(np.int64)
    train, test = train_test_split(np.arange(len(labels)), test_size=test_fraction, stratify=labels,
                                   random_state=seed)
    return raw, labels, np.sort(train), np.sort(test)


def load_reference_train_data() -> tuple[Tensor, Tensor]:
    """The reference model's training split (needs scikit-learn), preprocessed like the test split;
    for calibrating reducers without touching the held-out images."""
    config = load_reference_config()
    norm, split = config["normalisation"], config["dataset"]
    raw, labels, train, _ = digits_split(split["test_fraction"], split["split_seed"])
    images = preprocess_digits(raw[train], norm["mean"], norm["std"], config["input_size"][-1])
    return images, torch.as_tensor(labels[train], dtype=torch.long)


def load_reference_data() -> tuple[Tensor, Tensor]:
    """The held-out digits split: normalised images (N, 1, 32, 32) float32 and labels (N,) long."""
    config = load_reference_config()
    norm = config["normalisation"]
    with np.load(_asset(DATA_FILE)) as data:
        raw, labels = data["images"], data["labels"]
    images = preprocess_digits(raw, norm["mean"], norm["std"], config["input_size"][-1])
    return images, torch.as_tensor(labels, dtype=torch.long)
