"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More", EMNLP 2025): keep the visual tokens that duplicate a few pivot
tokens least.

Before decoder layer K (default 2) of the language model, per sample:

1. Pivots. The ``image_pivots`` visual tokens and the ``text_pivots`` text tokens after the
   image with the largest L1 norm of their layer K - 1 keys (summed over KV heads and head
   dims) are the pivots.
2. Image pivots are kept; they count towards the k kept visual tokens. The remaining budget,
   k - (image pivots), is split evenly over all pivots (image and text): each gets
   ``budget // P`` picks, and the first ``budget % P`` pivots one more, so exactly k visual
   tokens stay. (The reference gives every pivot ``floor(k / P)`` picks and keeps the image
   pivots on top of them, so it keeps k + (image pivots) - (k mod P) tokens, e.g. 132 for
   k = 128 with 4 + 4 pivots; tokred keeps exactly k.)
3. Pivot by pivot, each picks its quota of the visual tokens least cosine-similar to it, on
   the hidden states entering layer K, from a pool of the visual tokens that are not image
   pivots; picks leave the pool, so no token is picked twice.
4. Text is never pruned: the text pivots only guide the choice.

Order and ties (the reference walks a Python ``set`` of pivot positions, whose order is
an implementation detail, and uses ``topk``, whose ties are unspecified; tokred fixes both):
image pivots come first, then text pivots, each group in descending key norm; every ranking
(key norm, similarity) breaks ties towards the lower position.

Edge cases: if k is at most ``image_pivots`` the k visual tokens with the largest key norm
are kept (pivots only, no picks). A sample with fewer text tokens after the image than
``text_pivots`` uses all it has. If there is no pivot at all (``image_pivots=0`` and no text
after the image), the visual token with the largest key norm becomes the one image pivot.

Fidelity note: the reference passes the hidden states through the language model's final
norm before the cosine similarity (RMSNorm's per-channel weight changes cosines);
``SequenceSignal.hidden`` is exactly that (the LLaVA adapter applies the norm).

:func:`select` is the rule for one sample as a pure function; :class:`DART` applies it at the
``llm`` stage of a vision-language model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from tokred.reducers.base import DecoderReducer, check_finite
from tokred.sequence import keep_visual, visual_count

if TYPE_CHECKING:
    from tokred.signals import SequenceSignal


def check_pivots(image_pivots, text_pivots) -> None:
    """A ``ValueError`` unless both pivot counts are ints >= 0 and not both 0."""
    for name, value in (("image_pivots", image_pivots), ("text_pivots", text_pivots)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if image_pivots == 0 and text_pivots == 0:
        raise ValueError("image_pivots and text_pivots are both 0, but DART needs at least one pivot to measure "
                         "duplication against; set either to 1 or more (default 4 and 4)")


def budget(num_visual: int, num_text: int, k: int, image_pivots: int = 4,
           text_pivots: int = 4) -> tuple[int, int, list[int]]:
    """How DART spends a budget of k visual tokens on one sample.

    Returns ``(image pivots used, text pivots used, picks per pivot)``, the picks listed in
    pivot order (image pivots, then text pivots); image pivots plus picks add up to k.
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_visual:
        raise ValueError(f"k must be an int in [1, {num_visual}] (the number of visual tokens), got {k!r}")
    num_text_pivots = min(text_pivots, num_text)
    wanted_image_pivots = image_pivots if image_pivots or num_text_pivots else 1  # no pivot at all: use one
    num_image_pivots = min(wanted_image_pivots, k)
    picks = k - num_image_pivots
    pivots = num_image_pivots + num_text_pivots
    quotas = [picks // pivots + (i < picks % pivots) for i in range(pivots)]
    return num_image_pivots, num_text_pivots, quotas


def _top(scores: Tensor, positions: Tensor, count: int) -> Tensor:
    """The ``count`` positions with the largest scores, in descending score, ties to the lower position."""
    order = torch.sort(scores, descending=True, stable=True).indices[:count]
    return positions[order]


def select(hidden: Tensor, key_norm: Tensor, visual: Tensor, text: Tensor, k: int, image_pivots: int = 4,
           text_pivots: int = 4) -> Tensor:
    """Positions (k,), ascending, of the visual tokens DART keeps in one sample.

    Args:
        hidden: (L, C) hidden states entering decoder layer K (compared by cosine similarity).
        key_norm: (L,) L1 norm of each token's layer K - 1 keys (over KV heads and head dims).
        visual: (L,) True for the visual tokens (the candidates).
        text: (L,) True for the text tokens that may be pivots (the text after the image).
        k: visual tokens to keep, 1 <= k <= visual.sum().
        image_pivots, text_pivots: pivot counts (see the module docstring for the full rule).

    Runs P steps (one per pivot) after one P x N similarity matmul; no loop over tokens.
    """
    check_pivots(image_pivots, text_pivots)
    length = hidden.shape[0]
    if hidden.dim() != 2 or key_norm.shape != (length,) or visual.shape != (length,) or text.shape != (length,):
        raise ValueError(f"expected hidden (L, C) and key_norm, visual, text (L,); got {tuple(hidden.shape)}, "
                         f"{tuple(key_norm.shape)}, {tuple(visual.shape)}, {tuple(text.shape)}")
    if visual.dtype != torch.bool or text.dtype != torch.bool:
        raise ValueError("visual and text must be bool masks")
    if bool((visual & text).any()):
        raise ValueError("a token cannot be both visual and a text pivot candidate")
    check_finite("DART", "the hidden states", hidden[visual | text])
    check_finite("DART", "the key norms", key_norm[visual | text])
    visual_positions = visual.nonzero().squeeze(1)
    text_positions = text.nonzero().squeeze(1)
    num_image_pivots, num_text_pivots, quotas = budget(len(visual_positions), len(text_positions), k,
                                                        image_pivots, text_pivots)
    norm = key_norm.float() if key_norm.dtype != torch.float64 else key_norm
    image_pivot_positions = _top(norm[visual_positions], visual_positions, num_image_pivots)
    if sum(quotas) == 0:
        return image_pivot_positions.sort().values
    text_pivot_positions = _top(norm[text_positions], text_positions, num_text_pivots)
    pivots = torch.cat([image_pivot_positions, text_pivot_positions])
    in_pool = visual.clone()
    in_pool[image_pivot_positions] = False
    pool = in_pool.nonzero().squeeze(1)
    unit = F.normalize(hidden.to(torch.promote_types(hidden.dtype, torch.float32)), dim=-1)
    similarity = unit[pivots] @ unit[pool].T  # (P, pool)
    picked = torch.zeros(len(pool), dtype=torch.bool, device=hidden.device)
    for row, quota in zip(similarity, quotas):
        if quota:
            # least similar first; picked tokens last (cosines are finite); stable: ties to the lower position
            order = torch.sort(row.masked_fill(picked, torch.inf), stable=True).indices[:quota]
            picked[order] = True
    return torch.cat([image_pivot_positions, pool[picked]]).sort().values


def select_flops(num_visual: int, num_text: int, k: int, channels: int, image_pivots: int = 4,
                 text_pivots: int = 4) -> int:
    """FLOPs of :func:`select` for one sample: the pivots x pool cosine-similarity matmul."""
    num_image_pivots, num_text_pivots, quotas = budget(num_visual, num_text, k, image_pivots, text_pivots)
    if sum(quotas) == 0:
        return 0
    return 2 * (num_image_pivots + num_text_pivots) * (num_visual - num_image_pivots) * channels


def key_norms(keys: Tensor) -> Tensor:
    """(B, L) L1 norm of each token's keys (B, H_kv, L, D), over KV heads and head dims."""
    return keys.to(torch.promote_types(keys.dtype, torch.float32)).abs().sum(dim=(1, 3))


def text_after_image(signal: SequenceSignal) -> Tensor:
    """(B, L) the text tokens DART may take as pivots: prompt tokens after each sample's last visual token."""
    positions = torch.arange(signal.visual.shape[1], device=signal.visual.device)
    last_visual = torch.where(signal.visual, positions, -1).amax(dim=1, keepdim=True)
    return signal.prompt & signal.valid & ~signal.visual & (positions > last_visual)


@dataclass(frozen=True)
class DART(DecoderReducer):
    """DART at the ``llm`` stage: before decoder layer ``layer``, each sample keeps the visual
    tokens least duplicated by a few pivot tokens (the rule: :mod:`tokred.reducers.dart`).

    Args:
        keep: visual tokens kept per sample: a fraction in (0, 1] (round(keep * N), at least 1), a
            count, or a :class:`~tokred.Budget` (measured on the sample's visual hidden states).
        layer: the decoder layer K before which visual tokens are pruned (K >= 1; the keys come
            from layer K - 1).
        image_pivots: visual pivot tokens (largest key norm); they are kept.
        text_pivots: text pivot tokens, from the prompt after the image; text is always kept.
        positions: position ids of the remaining tokens: ``"keep"`` (the original positions,
            with gaps, as DART does) or ``"renumber"`` (contiguous).

    Samples without visual tokens are left untouched.
    """

    keep: int | float
    layer: int = 2
    image_pivots: int = 4
    text_pivots: int = 4
    positions: str = "keep"

    needs_keys: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        check_pivots(self.image_pivots, self.text_pivots)

    def keep_mask(self, signal: SequenceSignal) -> Tensor:
        if signal.keys is None:
            raise ValueError("DART needs the keys of decoder layer K - 1 (SequenceSignal.keys), got None")
        norms, text = key_norms(signal.keys), text_after_image(signal)
        return keep_visual(signal, self.keep, lambda b, k: select(signal.hidden[b], norms[b], signal.visual[b],
                                                                  text[b], k, self.image_pivots, self.text_pivots))

    def overhead_flops(self, signal: SequenceSignal) -> int:
        num_visual = signal.visual.sum(dim=1).tolist()
        num_text = text_after_image(signal).sum(dim=1).tolist()
        channels = signal.hidden.shape[-1]
        return sum(select_flops(n, t, visual_count(self.keep, signal, b), channels, self.image_pivots,
                                self.text_pivots) for b, (n, t) in enumerate(zip(num_visual, num_text)) if n)
