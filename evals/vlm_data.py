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

Video clips (:func:`clip`, ``VIDEO_FAMILIES``, their own scene seeds ``VIDEO_SPLITS`` and the same
digit-image splits): 8 frames of the same canvas and grid, 2 to 4 digit objects (distinct digits) that
appear, make one or two one-cell steps in one direction and may disappear; static distractors, fresh
noise per frame. Every target is the per-frame description (8 x 16 cells) before the answer, so the
dense ``frames`` family is the reading the temporal questions (``last``, ``moved``, ``distinct``) rest on.
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
        _paste(canvas, image * rng.uniform(0.7, 1.0), int(cell), dy, dx)
        grid[int(cell)] = digit
    _draw_distractors(rng, canvas, [c for c in range(GRID * GRID) if grid[c] < 0])
    return _finish(rng, canvas), tuple(grid)


def _paste(canvas: np.ndarray, digit: np.ndarray, cell: int, dy: int, dx: int) -> None:
    """Draw a 16x16 digit (maximum blend) at offset (dy, dx) inside ``cell``."""
    y, x = (cell // GRID) * CELL + dy, (cell % GRID) * CELL + dx
    patch = canvas[y:y + DIGIT, x:x + DIGIT]
    np.maximum(patch, digit, out=patch)


def _draw_distractors(rng: np.random.Generator, canvas: np.ndarray, empty: list[int]) -> None:
    """0 to ``MAX_DISTRACTORS`` of the ``empty`` cells get a dot or a short dash (not a digit)."""
    for cell in rng.choice(empty, size=int(rng.integers(0, MAX_DISTRACTORS + 1)), replace=False):
        value = rng.uniform(0.5, 1.0)
        if rng.random() < 0.5:   # a dot, 2-3 px square
            h = w = int(rng.integers(2, 4))
        else:                    # a short horizontal dash
            h, w = int(rng.integers(1, 3)), int(rng.integers(3, 7))
        y = (cell // GRID) * CELL + int(rng.integers(2, CELL - h - 1))
        x = (cell % GRID) * CELL + int(rng.integers(2, CELL - w - 1))
        canvas[y:y + h, x:x + w] = np.maximum(canvas[y:y + h, x:x + w], value)


def _finish(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    """Add the faint noise and quantise to uint8."""
    canvas = canvas + rng.normal(0.0, NOISE, size=canvas.shape)
    return np.rint(np.clip(canvas, 0.0, 1.0) * 255).astype(np.uint8)


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


def get(split: str, family: str, index: int):
    """Item ``index`` of ``family``: an :class:`Example` (a scene), or a :class:`Clip` for the video families."""
    return (clip if family in VIDEO_FAMILIES else example)(split, family, index)


def examples(split: str, family: str, count: int, start: int = 0):
    """Lazily, items ``start`` .. ``start + count - 1`` of one family (see :func:`get`)."""
    for i in range(start, start + count):
        yield get(split, family, i)


def prompt(ex) -> str:
    return (VIDEO_PROMPT if isinstance(ex, Clip) else PROMPT).format(question=ex.question)


def parse(generated: str) -> tuple[list[str], str]:
    """A generated target -> (description words, scored answer: the last word after ``;``)."""
    words = generated.split()
    if ";" in words:
        cut = words.index(";")
        desc, rest = words[:cut], words[cut + 1:]
    else:
        desc, rest = words, []
    return desc, (rest[-1] if rest else "")


def score(ex, generated: str) -> dict:
    """Scores of one generated target (of an :class:`Example` or a :class:`Clip`): ``correct`` (the
    answer, or the whole description for the dense families ``describe`` and ``frames``) and, for
    those, ``cells_correct`` out of ``cells`` (16 per image, 16 per frame of a clip) and
    ``digits_correct`` out of ``digits``, the cells that hold a digit (most cells of a clip are
    empty, so writing ``empty`` everywhere scores high per cell and 0 here)."""
    desc, answer = parse(generated)
    if ex.family in DENSE:
        truth = ex.answer.split()
        cells = sum(a == b for a, b in zip(desc, truth))
        digits = sum(a == b for a, b in zip(desc, truth) if b != EMPTY)
        return {"correct": desc == truth, "cells_correct": cells, "cells": len(truth), "digits_correct": digits,
                "digits": sum(b != EMPTY for b in truth)}
    return {"correct": answer == ex.answer}


# ---------------------------------------------------------------- video clips

FRAMES = 8                  # frames per clip
MIN_OBJECTS, MAX_OBJECTS = 2, 4
MIN_LIFE = 3                # frames an object stays visible, at least
MAX_MOVES = 2               # cell steps an object makes, 1 or 2, all in one direction
VIDEO_FAMILIES = ("frames", "last", "moved", "distinct")
VIDEO_SPLITS = {"train": 21, "val": 22, "test": 23}   # clip seeds per split
STEPS = {"up": -GRID, "down": GRID, "left": -1, "right": 1}   # a move's change of cell index
VIDEO_WORDS = ("video", "appeared", "last", "way", "did", "move", "distinct", "digits", "up", "down", "right")
VIDEO_PROMPT = "<video> {question} ?"
#: the fixed slice of the clips' test split a CI test scores: the first n clips per family
VIDEO_SLICE = {"frames": 20, "last": 30, "moved": 30, "distinct": 30}
DENSE = ("describe", "frames")   # families scored per cell


@dataclasses.dataclass(frozen=True)
class Clip:
    split: str
    family: str
    index: int
    frames: np.ndarray         # (FRAMES, 96, 96) uint8
    grids: tuple               # per frame, 16 cells in raster order: digit 0..9 or -1 (empty)
    objects: tuple             # per object: (digit, first frame, end frame (exclusive), direction)
    question: str
    target: str                # the per-frame description ; answer
    answer: str                # the scored word (for ``frames``: the description)


def _starts(direction: str, back: str, forth: str, moves: int) -> range:
    """Start rows (or columns) from which ``moves`` steps in ``direction`` stay inside the grid."""
    return range(moves, GRID) if direction == back else range(GRID - moves) if direction == forth else range(GRID)


def _tracks(rng: np.random.Generator) -> tuple[tuple, list[list[int]]]:
    """Objects of one clip and each one's cell per frame (-1: not visible), drawn until valid:
    distinct digits, no two objects in one cell in one frame, and one object appears strictly
    after all others (and after frame 1), so "which digit appeared last" has one answer."""
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))   # drawn once, so the counts stay uniform
    while True:
        objects, cells = [], []
        for digit in rng.choice(10, size=n, replace=False):
            first = int(rng.integers(0, FRAMES - MIN_LIFE + 1))
            end = int(rng.integers(first + MIN_LIFE, FRAMES + 1))
            direction = tuple(STEPS)[int(rng.integers(len(STEPS)))]
            moves = int(rng.integers(1, MAX_MOVES + 1))
            moved_at = set(int(f) for f in rng.choice(np.arange(first + 1, end), size=moves, replace=False))
            rows, cols = _starts(direction, "up", "down", moves), _starts(direction, "left", "right", moves)
            cell = int(rows[int(rng.integers(len(rows)))]) * GRID + int(cols[int(rng.integers(len(cols)))])
            track = []
            for frame in range(FRAMES):
                cell += STEPS[direction] if frame in moved_at else 0
                track.append(cell if first <= frame < end else -1)
            objects.append((int(digit), first, end, direction))
            cells.append(track)
        starts = sorted(o[1] for o in objects)
        clash = any(len(set(occupied)) < len(occupied)
                    for occupied in ([t[f] for t in cells if t[f] >= 0] for f in range(FRAMES)))
        if not clash and starts[-1] > starts[-2]:
            return tuple(objects), cells


def render_clip(rng: np.random.Generator, split: str) -> tuple[np.ndarray, tuple, tuple]:
    """One clip: (FRAMES x 96 x 96 uint8 frames, per-frame 16-cell grids, objects). Each object is one
    digit image drawn like the scenes' (same size, offset inside its cell and intensity in every
    frame); distractors stay in cells no object ever visits; every frame has its own noise."""
    images, labels, _ = digit_pools()[split]
    objects, cells = _tracks(rng)
    background = np.zeros((CANVAS, CANVAS), dtype=np.float64)
    looks = []
    for digit, *_ in objects:
        choices = np.flatnonzero(labels == digit)
        image = images[choices[int(rng.integers(len(choices)))]] * rng.uniform(0.7, 1.0)
        looks.append((image, *(int(v) for v in rng.integers(0, CELL - DIGIT + 1, size=2))))
    visited = {c for track in cells for c in track}
    _draw_distractors(rng, background, [c for c in range(GRID * GRID) if c not in visited])
    frames, grids = [], []
    for f in range(FRAMES):
        canvas, grid = background.copy(), [-1] * (GRID * GRID)
        for (digit, *_), track, (image, dy, dx) in zip(objects, cells, looks):
            if track[f] >= 0:
                _paste(canvas, image, track[f], dy, dx)
                grid[track[f]] = digit
        frames.append(_finish(rng, canvas))
        grids.append(tuple(grid))
    return np.stack(frames), tuple(grids), objects


def _clip_question(rng: np.random.Generator, family: str, objects: tuple) -> tuple[str, str]:
    """(question, answer) of a temporal family; objects are (digit, first, end, direction)."""
    if family == "last":
        return "which digit appeared last", str(max(objects, key=lambda o: o[1])[0])
    if family == "moved":
        digit, _, _, direction = objects[int(rng.integers(len(objects)))]
        return f"which way did {digit} move", direction
    if family == "distinct":
        return "how many distinct digits appeared", str(len(objects))
    raise ValueError(f"unknown video family {family!r}; expected one of {VIDEO_FAMILIES}")


def clip(split: str, family: str, index: int) -> Clip:
    """Clip ``index`` of video ``family`` in ``split``: a pure function of its arguments.

    Families (``VIDEO_FAMILIES``); every target is the per-frame description (``FRAMES`` x 16 cells,
    frame by frame, raster order), ``;``, then the answer:

    - ``frames``    "describe the video" -> the per-frame description
    - ``last``      "which digit appeared last" -> the digit whose first frame is the latest (unique, > 1)
    - ``moved``     "which way did 7 move" -> ``up`` / ``down`` / ``left`` / ``right`` (every object
      makes 1 or 2 one-cell steps in one direction while visible)
    - ``distinct``  "how many distinct digits appeared" -> 2..4 (objects are distinct digits, and
      they need not all be visible in one frame)
    """
    if split not in VIDEO_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(VIDEO_SPLITS)}")
    if family not in VIDEO_FAMILIES:
        raise ValueError(f"unknown video family {family!r}; expected one of {VIDEO_FAMILIES}")
    rng = np.random.default_rng([VIDEO_SPLITS[split], VIDEO_FAMILIES.index(family), int(index)])
    frames, grids, objects = render_clip(rng, split)
    description = " ".join(describe(g) for g in grids)
    if family == "frames":
        question, answer, target = "describe the video", description, description + " ;"
    else:
        question, answer = _clip_question(rng, family, objects)
        target = f"{description} ; {answer}"
    return Clip(split, family, int(index), frames, grids, objects, question, target, answer)
