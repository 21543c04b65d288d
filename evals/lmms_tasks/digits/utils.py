"""lmms-eval tasks over the shipped digits VLM's test questions (``evals/vlm_data.py``), offline.

The questions are generated, not stored: a task's documents are ``{"family", "index"}`` rows and every
image, prompt and answer is the pure function ``vlm_data.example("test", family, index)``. So the
``tokred_digits_<family>`` tasks hold exactly the questions ``evals/sweep_vlm.py`` exports for
``tokred sweep``, in the same order (``--limit N`` here is ``--per-family N`` there), prompted and scored
the same way (the prompt as written; ``tokred.cli.vlm_sweep.score``: ``describe`` word by word, so per
cell, the other families by the last word).

``DigitsTask`` builds that table in place of downloading a data set (lmms-eval 0.7's ``ConfigurableTask``
loads ``dataset_path`` in ``download``; a local file would have to be named relative to the current
directory).
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import datasets
import numpy as np
from lmms_eval.api.task import ConfigurableTask
from PIL import Image

from tokred.cli import vlm_sweep

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # evals/
import vlm_data  # noqa: E402

#: test questions per family, as evals/sweep_vlm.py's default --per-family
PER_FAMILY = 2000
#: answer choices of the multiple-choice variant: the true description and this many with one cell changed
DISTRACTORS = 3


class DigitsTask(ConfigurableTask):
    """A task whose test split is the first ``PER_FAMILY`` questions of ``dataset_name`` (a family)."""

    def __init__(self, config: dict):
        config = {k: v for k, v in config.items() if k != "class"}
        super().__init__(config=config)

    def download(self, dataset_kwargs=None) -> None:
        family = self.config.dataset_name
        if family not in vlm_data.FAMILIES:
            raise ValueError(f"dataset_name {family!r} is no question family; expected one of {vlm_data.FAMILIES}")
        rows = datasets.Dataset.from_list([{"family": family, "index": i} for i in range(PER_FAMILY)])
        self.dataset = self.dataset_no_image = datasets.DatasetDict({"test": rows})


@functools.lru_cache(maxsize=4096)
def example(family: str, index: int) -> vlm_data.Example:
    return vlm_data.example("test", family, index)


def _example(doc) -> vlm_data.Example:
    return example(doc["family"], int(doc["index"]))


def doc_to_visual(doc):
    return [Image.fromarray(_example(doc).image).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return vlm_data.prompt(_example(doc))


def doc_to_target(doc):
    return _example(doc).answer


def question(doc) -> vlm_sweep.Question:
    """The document as a question of ``tokred sweep``, as ``evals/sweep_vlm.py`` exports it."""
    ex = _example(doc)
    return vlm_sweep.Question(answer=ex.answer, prompt=vlm_data.prompt(ex), family=ex.family,
                              score="words" if ex.family == "describe" else "last_word")


def process_results(doc, results):
    """``tokred sweep``'s score of one answer: ``accuracy`` = credit / out of (``describe``: the fraction of
    its 16 cells right, so the mean over documents is the per-cell accuracy), ``exact_match`` = all right."""
    credit, total, exact = vlm_sweep.score(question(doc), results[0])
    return {"accuracy": credit / total, "exact_match": float(exact)}


# multiple choice: which description is right ----------------------------------------------------------

def doc_to_choice(doc):
    """The true description of the scene and ``DISTRACTORS`` others that differ from it in one cell each
    (cells and values drawn from the document's index), the truth at position ``index % (DISTRACTORS + 1)``."""
    ex = _example(doc)
    grid = list(ex.grid)
    rng = np.random.default_rng([int(doc["index"]), 7])
    wrong = []
    for cell in rng.choice(len(grid), size=DISTRACTORS, replace=False):
        other = [d for d in range(-1, 10) if d != grid[cell]]
        changed = list(grid)
        changed[cell] = other[int(rng.integers(len(other)))]
        wrong.append(vlm_data.describe(changed))
    truth = int(doc["index"]) % (DISTRACTORS + 1)
    return wrong[:truth] + [vlm_data.describe(grid)] + wrong[truth:]


def doc_to_choice_target(doc):
    return int(doc["index"]) % (DISTRACTORS + 1)
