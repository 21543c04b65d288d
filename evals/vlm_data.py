"""Digit scenes and questions for the shipped digits VLM: generated offline, deterministic, no download.

The images are scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``: 1,797
8x8 images, values 0..16; the UCI "Optical Recognition of Handwritten Digits" set, CC BY 4.0).
The generator *is* the data set: nothing is stored, every example is a pure function of
``(split, family, index)``, and the same arguments give the same bytes (tests/test_vlm_yardstick.py
pins a hash of the first examples of every family).

Scene: a 96x96 grey canvas (uint8, shown to the model as RGB) cut into a 4x4 grid of 24-px cells.
3 to 7 cells hold a digit (drawn from a palette of 2 to 5 digit classes per scene, so digits
repeat; upscaled bilinearly to 16x16, at a random offset inside its cell, random intensity), 0 to 2
empty cells hold a distractor (a small dot or a short dash, which is not a digit), and faint noise
covers the canvas. With the model's 12-px patches every cell is 2x2
visual tokens (64 in all), so dropping visual tokens removes the evidence for some cells.

Digit images are split once, stratified: ``test`` uses the same held-out 20% (seed 0) as the
digits ViT (``assets/digits_test.npz``), ``val`` 10% of the rest, ``train`` the remainder, so no
digit image appears in two splits; scenes of different splits also come from different seeds.

Question families (``FAMILIES``); rows and columns count from 1, "empty" means no digit:

- ``describe``  "describe the image" -> the 16 cells in raster order, a digit or ``empty`` each
- ``cell``      "what digit is at row 2 column 3" -> a digit or ``empty``
- ``count``     "how many 7 are there" -> 0..7
- ``exists``    "is there a 7" -> ``yes`` / ``no`` (balanced)
- ``left``      "which digit is left of 7" (7 occurs once, not in column 1) -> the digit in the
  cell just left of it, or ``empty``
- ``sum``       "what is the sum of row 1 column 2 and row 3 column 4" (two cells with digits)
  -> 0..18

The model answers every question the same way (the *target*): it first writes the description,
then ``;``, then the answer — ``sum`` also writes the two addends: ``3 + 5 = 8``. Only the final
word is scored as the answer (:func:`score`); the description family is scored per cell and as a
whole grid.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

GRID = 4                    # cells per side
CELL = 24                   # pixels per cell
CANVAS = GRID * CELL        # 96
DIGIT = 16                  # pixels per rendered digit
MIN_DIGITS, MAX_DIGITS = 3, 7
MAX_DISTRACTORS = 2
NOISE = 0.04                # std of the canvas noise, in [0, 1] units
FAMILIES = ("describe", "cell", "count", "exists", "left", "sum")
SPLITS = {"train": 11, "val": 12, "test": 13}   # scene seeds per split
DIGIT_SPLIT_SEED = 0
TEST_FRACTION, VAL_FRACTION = 0.2, 0.1
EMPTY = "empty"

#: every word the questions and targets use (the VLM's word-level vocabulary, specials excluded)
WORDS = tuple(str(i) for i in range(19)) + (
    EMPTY, "describe", "the", "image", "what", "digit", "is", "at", "row", "column", "how", "many", "are",
    "there", "a", "which", "left", "of", "sum", "and", "yes", "no", ";", "+", "=", "?")

#: the fixed 200-question slice of the test split the CI test scores: the first n questions per family
SLICE = {"describe": 35, "cell": 33, "count": 33, "exists": 33, "left": 33, "sum": 33}

#: the prompt the model is trained on (``<image>`` expands to the visual tokens)
PROMPT = "<image> {question} ?"


@dataclasses.dataclass(frozen=True)
class Example:
    split: str
    family: str
    index: int
    image: np.ndarray          # (96, 96) uint8
    grid: tuple                # 16 cells in raster order: digit 0..9 or -1 (empty)
    question: str
    target: str                # what the model is trained to write: description ; answer
    answer: str                # the scored word (for ``describe``: the description)


def _upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Bilinear interpolation matrix (align_corners=False), rows sum to 1."""
    m = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        x = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
        lo = int(np.floor(x))
        hi = min(lo + 1, n_in - 1)
        m[i, lo] += 1 - (x - lo)
        m[i, hi] += x - lo
    return m


@functools.lru_cache(maxsize=None)
def digit_pools() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per split: (images upscaled to 16x16 in [0, 1], float64, labels, indices into ``load_digits``).
    The splits' digit images are disjoint."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    raw, labels = data.images.astype(np.float64) / 16.0, data.target.astype(np.int64)
    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=TEST_FRACTION, stratify=labels, random_state=DIGIT_SPLIT_SEED)
    train, val = train_test_split(rest, test_size=VAL_FRACTION / (1 - TEST_FRACTION), stratify=labels[rest],
                                  random_state=DIGIT_SPLIT_SEED)
    up = _upsample_matrix(8, DIGIT)
    big = np.einsum("ij,njk,lk->nil", up, raw, up)
    return {name: (big[np.sort(part)], labels[np.sort(part)], np.sort(part))
            for name, part in (("train", train), ("val", val), ("test", test))}


def render_scene(rng: np.random.Generator, split: str) -> tuple[np.ndarray, tuple]:
    """One scene: (96x96 uint8 image, 16-cell grid with -1 for empty cells)."""
    images, labels, _ = digit_pools()[split]
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.float64)
    grid = [-1] * (GRID * GRID)
    k = int(rng.integers(MIN_DIGITS, MAX_DIGITS + 1))
    cells = rng.choice(GRID * GRID, size=k, replace=False)
    palette = rng.choice(10, size=int(rng.integers(2, 6)), replace=False)  # repeats make counting matter
    for cell in cells:
        digit = int(palette[int(rng.integers(len(palette)))])
        choices = np.flatnonzero(labels == digit)
        image = images[choices[int(rng.integers(len(choices)))]]
        dy, dx = (int(v) for v in rng.integers(0, CELL - DIGIT + 1, size=2))
        y, x = (cell // GRID) * CELL + dy, (cell % GRID) * CELL + dx
        patch = canvas[y:y + DIGIT, x:x + DIGIT]
        np.maximum(patch, image * rng.uniform(0.7, 1.0), out=patch)
        grid[int(cell)] = digit
    empty = [c for c in range(GRID * GRID) if grid[c] < 0]
    for cell in rng.choice(empty, size=int(rng.integers(0, MAX_DISTRACTORS + 1)), replace=False):
        value = rng.uniform(0.5, 1.0)
        if rng.random() < 0.5:   # a dot, 2-3 px square
            h = w = int(rng.integers(2, 4))
        else:                    # a short horizontal dash
            h, w = int(rng.integers(1, 3)), int(rng.integers(3, 7))
        y = (cell // GRID) * CELL + int(rng.integers(2, CELL - h - 1))
        x = (cell % GRID) * CELL + int(rng.integers(2, CELL - w - 1))
        canvas[y:y + h, x:x + w] = np.maximum(canvas[y:y + h, x:x + w], value)
    canvas += rng.normal(0.0, NOISE, size=canvas.shape)
    image = np.rint(np.clip(canvas, 0.0, 1.0) * 255).astype(np.uint8)
    return image, tuple(grid)


def describe(grid) -> str:
    return " ".join(EMPTY if d < 0 else str(d) for d in grid)


def _where(cell: int) -> str:
    return f"row {cell // GRID + 1} column {cell % GRID + 1}"


def _question(rng: np.random.Generator, family: str, grid: tuple) -> tuple[str, str, str] | None:
    """(question, answer part of the target, scored answer), or None if the scene cannot pose it."""
    present = sorted({d for d in grid if d >= 0})
    occupied = [c for c, d in enumerate(grid) if d >= 0]
    name = lambda d: EMPTY if d < 0 else str(d)  # noqa: E731
    if family == "describe":
        return "describe the image", "", describe(grid)
    if family == "cell":
        if rng.random() < 0.8:
            cell = occupied[int(rng.integers(len(occupied)))]
        else:
            cell = int(rng.integers(GRID * GRID))
        answer = name(grid[cell])
        return f"what digit is at {_where(cell)}", answer, answer
    if family == "count":
        digit = present[int(rng.integers(len(present)))] if rng.random() < 0.7 else int(rng.integers(10))
        answer = str(sum(d == digit for d in grid))
        return f"how many {digit} are there", answer, answer
    if family == "exists":
        pool = present if rng.random() < 0.5 else [d for d in range(10) if d not in present]
        digit = pool[int(rng.integers(len(pool)))]
        answer = "yes" if digit in present else "no"
        return f"is there a {digit}", answer, answer
    if family == "left":
        unique = [c for c in occupied if c % GRID > 0 and sum(d == grid[c] for d in grid) == 1]
        if not unique:
            return None
        with_neighbour = [c for c in unique if grid[c - 1] >= 0]
        if not with_neighbour and rng.random() < 0.8:  # keep "empty" from dominating the answers
            return None
        pool = with_neighbour if with_neighbour and rng.random() < 0.85 else unique
        cell = pool[int(rng.integers(len(pool)))]
        answer = name(grid[cell - 1])
        return f"which digit is left of {grid[cell]}", answer, answer
    if family == "sum":
        a, b = (int(c) for c in rng.choice(occupied, size=2, replace=False))
        total = str(grid[a] + grid[b])
        return f"what is the sum of {_where(a)} and {_where(b)}", f"{grid[a]} + {grid[b]} = {total}", total
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def example(split: str, family: str, index: int) -> Example:
    """Example ``index`` of ``family`` in ``split``: a pure function of its arguments."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLITS)}")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    rng = np.random.default_rng([SPLITS[split], FAMILIES.index(family), int(index)])
    while True:
        image, grid = render_scene(rng, split)
        posed = _question(rng, family, grid)
        if posed is not None:
            break
    question, answer_part, answer = posed
    target = describe(grid) + " ;" + (f" {answer_part}" if answer_part else "")
    return Example(split, family, int(index), image, grid, question, target, answer)


def examples(split: str, family: str, count: int, start: int = 0):
    """Lazily, examples ``start`` .. ``start + count - 1`` of one family."""
    for i in range(start, start + count):
        yield example(split, family, i)


def prompt(ex: Example) -> str:
    return PROMPT.format(question=ex.question)


def parse(generated: str) -> tuple[list[str], str]:
    """A generated target -> (description words, scored answer: the last word after ``;``)."""
    words = generated.split()
    if ";" in words:
        cut = words.index(";")
        desc, rest = words[:cut], words[cut + 1:]
    else:
        desc, rest = words, []
    return desc, (rest[-1] if rest else "")


def score(ex: Example, generated: str) -> dict:
    """Scores of one generated target: ``correct`` (the answer, or the whole grid for ``describe``)
    and, for ``describe``, ``cells_correct`` out of 16."""
    desc, answer = parse(generated)
    if ex.family == "describe":
        truth = ex.answer.split()
        cells = sum(a == b for a, b in zip(desc, truth))
        return {"correct": desc == truth, "cells_correct": cells, "cells": len(truth)}
    return {"correct": answer == ex.answer}
