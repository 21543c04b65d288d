"""Content-adaptive budgets: a per-image ``keep`` from a signal of the image's content, for any
reducer with a ``keep`` (DivPrune, Random, FastV, DART, AdjacentMerge).

A :class:`Budget` is fitted on unlabeled calibration data (:meth:`Budget.fit`): it stores the
signal's values there (their empirical CDF F) and maps an image with signal s to

    keep(s) = clip(min_keep + (top - min_keep) * F(s), min_keep, max_keep)

a linear ramp in the CDF whose ``top`` is fitted so that the mean keep over the calibration set
equals ``mean_keep`` (the "average hits a target" contract of DyMU's thresholds). With
``buckets=(k_1, ..., k_m)`` the keep is instead one of m tiers, as CAT buckets images into
8x / 16x / 32x compression: tier j for F(s) between the cuts c_(j-1) and c_j, with the cuts at the
quantiles c_j = j / m + shift and ``shift`` fitted so that the calibration mean is as close to
``mean_keep`` as m discrete tiers allow. In both, keep never decreases as the signal grows.

Signals (:data:`SIGNALS`; larger = more content = more tokens), each a pure function here:

- ``dtome_count`` (DyMU): the number of tokens an image reaches the reducer with. After a
  vision-stage :class:`~tokred.DToMe` that is its survivor count, which DyMU's Fig. 3 shows
  tracks image complexity; without a merger before the reducer it is constant (and refused).
- ``cls_iqr`` (LLaVA-PruMerge's interquartile rule): the share of patches whose attention from
  the class token is an outlier, above Q3 + 1.5 IQR of that image's attention. Attention is
  single-matrix, softmax over patches of <x_cls, x_j> / sqrt(C) on the tokens the reducer sees
  (as a public PruMerge reproduction computes it), so it needs a class token: the ``vision``
  stage of a tower with one (``Random(keep=budget)``).
- ``distortion`` (KARL's rule, here in feature space): the smallest fraction k / N of tokens with
  relative distortion ||X - Unmerge(Merge_k(X))||^2 / ||X||^2 <= ``eps``, where Merge_k assigns
  every token to the nearest (cosine) of the first k tokens of DivPrune's greedy max-min order and
  takes group means, and Unmerge copies each mean back to its members.
- ``jpeg``: JPEG bytes per pixel at quality 75 of the input images. **tokred's heuristic** (no
  token-reduction paper uses it; CAT cites JPEG size as its intuition). A reducer never sees
  pixels, so it serves :meth:`Budget.fit` and :meth:`Budget.keeps` only, not ``keep=budget``.

The token signals are measured on the tokens the driven reducer sees: at the ``projector`` stage
each image's projected visual tokens, at the ``llm`` stage each sample's visual hidden states
entering layer K, at the ``vision`` stage the tokens entering the block (class token included).
Fit a budget on tokens from the same place (e.g. ``model.model.get_image_features`` for a LLaVA
projector-stage budget).

A Budget holds its calibration values, so it has no text-spec form: :func:`tokred.save_reducers`
writes it to JSON next to the spec and :func:`tokred.load_reducers` reads it back.
"""
from __future__ import annotations

import io
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tokred.plan import Plan
from tokred.reducers.base import check_finite, kept_count

SIGNALS = ("dtome_count", "cls_iqr", "distortion", "jpeg")
#: the JPEG quality of the ``jpeg`` signal
JPEG_QUALITY = 75


# signals ---------------------------------------------------------------------------------------------

def distortion(features: Tensor, k: int, order: Tensor | None = None) -> Tensor:
    """(B,) relative distortion ||X - Unmerge(Merge_k(X))||^2 / ||X||^2 of ``features`` (B, N, C)
    when every token is replaced by the mean of its group: the tokens nearest (cosine; ties to the
    earlier centre) to each of the first k tokens of ``order`` (B, >= k) (default: DivPrune's greedy order)."""
    from tokred.reducers.divprune import greedy_order

    x = features.double()
    order = greedy_order(features, k) if order is None else order[:, :k]
    unit = F.normalize(x, dim=-1)
    centres = torch.gather(unit, 1, order[..., None].expand(-1, -1, x.shape[-1]))
    group = (unit @ centres.transpose(-1, -2)).argmax(dim=-1)  # (B, N): the first maximum
    sums = x.new_zeros(x.shape[0], k, x.shape[-1]).scatter_add_(1, group[..., None].expand_as(x), x)
    counts = x.new_zeros(x.shape[0], k).scatter_add_(1, group, torch.ones_like(group, dtype=x.dtype))
    means = sums / counts.clamp_min(1)[..., None]
    error = (x - torch.gather(means, 1, group[..., None].expand_as(x))).pow(2).sum(dim=(1, 2))
    return error / x.pow(2).sum(dim=(1, 2)).clamp_min(torch.finfo(x.dtype).tiny)


def distortion_keep(features: Tensor, eps: float) -> Tensor:
    """(B,) KARL's rule in feature space: per image, k / N for the smallest k (found by bisection
    over k, with DivPrune's greedy order as the nested merge order) whose :func:`distortion` is at
    most ``eps``. k = N always qualifies (distortion 0). Bisection assumes the distortion does not
    grow with k, which the nested order makes typical but does not guarantee; where it does grow,
    the k found still meets ``eps`` and k - 1 does not."""
    from tokred.reducers.divprune import greedy_order

    batch, num_tokens, _ = features.shape
    check_finite("Budget", "the tokens", features)
    order = greedy_order(features, num_tokens)
    out = []
    for b in range(batch):
        low, high = 1, num_tokens  # distortion(high) <= eps; the answer lies in [low, high]
        while low < high:
            middle = (low + high) // 2
            if float(distortion(features[b:b + 1], middle, order[b:b + 1])) <= eps:
                high = middle
            else:
                low = middle + 1
        out.append(high / num_tokens)
    return torch.tensor(out, dtype=torch.float64)


def cls_outliers(tokens: Tensor) -> Tensor:
    """(B,) PruMerge's interquartile rule on ``tokens`` (B, 1 + N, C), class token first: the share
    of the N patches whose attention from the class token, softmax_j(<x_cls, x_j> / sqrt(C)), is
    above Q3 + 1.5 (Q3 - Q1) of that image's N values (quantiles interpolated linearly)."""
    x = tokens.double()
    attention = ((x[:, :1] @ x[:, 1:].transpose(-1, -2))[:, 0] / math.sqrt(x.shape[-1])).softmax(dim=-1)
    q1, q3 = torch.quantile(attention, torch.tensor([0.25, 0.75], dtype=x.dtype), dim=-1)
    return (attention > (q3 + 1.5 * (q3 - q1))[:, None]).double().mean(dim=-1)


def jpeg_bytes_per_pixel(images: Tensor, quality: int = JPEG_QUALITY) -> Tensor:
    """(B,) JPEG file size in bytes per pixel of ``images`` (B, 3, H, W) at ``quality`` (Pillow),
    each image scaled to 0..255 by its own minimum and maximum first (so normalised model inputs
    work). tokred's heuristic: larger files, more detail."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"the jpeg signal reads images (B, 3, H, W), got shape {tuple(images.shape)}")
    out = []
    for image in images.double():
        low, high = image.min(), image.max()
        scaled = ((image - low) / (high - low) * 255 if high > low else torch.zeros_like(image)).round()
        buffer = io.BytesIO()
        Image.fromarray(scaled.permute(1, 2, 0).to(torch.uint8).numpy()).save(buffer, format="JPEG", quality=quality)
        out.append(buffer.tell() / (image.shape[1] * image.shape[2]))
    return torch.tensor(out, dtype=torch.float64)


def measure(signal: str, x: Tensor, num_protected: int = 0, eps: float = 0.05) -> Tensor:
    """(B,) values of ``signal`` for ``x``: tokens (B, N, C) whose first ``num_protected`` are
    protected (class, registers), or, for ``jpeg``, images (B, 3, H, W)."""
    if signal == "jpeg":
        return jpeg_bytes_per_pixel(x)
    if x.dim() != 3:
        raise ValueError(f"the {signal} signal reads tokens (B, N, C), got shape {tuple(x.shape)}")
    if signal == "dtome_count":
        return torch.full((x.shape[0],), float(x.shape[1] - num_protected), dtype=torch.float64)
    if signal == "cls_iqr":
        if num_protected < 1:
            raise ValueError("the cls_iqr signal needs a class token, and the tokens at this stage have none (a "
                             "LLaVA projector or language model sees only patch tokens; SigLIP towers have no class "
                             "token): use it at the vision stage of a tower with one, or another signal")
        return cls_outliers(torch.cat([x[:, :1], x[:, num_protected:]], dim=1))
    return distortion_keep(x[:, num_protected:], eps)


# the budget -------------------------------------------------------------------------------------------

def _cdf(calibration: Tensor, scores: Tensor) -> Tensor:
    """Mid-rank empirical CDF of ``calibration`` (sorted) at ``scores``: (#below + #at or below) / 2n."""
    below = torch.searchsorted(calibration, scores, right=False)
    at_or_below = torch.searchsorted(calibration, scores, right=True)
    return (below + at_or_below).double() / (2 * len(calibration))


@dataclass(frozen=True, repr=False)
class Budget:
    """A per-image keep fraction from a content signal, fitted so the calibration mean is ``mean_keep``
    (the rule: :mod:`tokred.reducers.budget`). Build it with :meth:`Budget.fit`; pass it as any
    reducer's ``keep``: ``tokred.DivPrune(keep=budget)``.

    Attributes:
        signal: one of :data:`SIGNALS`.
        mean_keep: the target mean keep fraction on the calibration set.
        calibration: the signal's calibration values, sorted (its empirical CDF).
        fitted: the ramp's ``top`` (inf: every image keeps ``max_keep``), or the buckets' ``shift``.
        buckets: keep fractions of CAT-style tiers, ascending, or None for the linear ramp.
        min_keep, max_keep: the keep's bounds.
        eps: the distortion target of the ``distortion`` signal.
    """

    signal: str
    mean_keep: float
    calibration: tuple[float, ...]
    fitted: float
    buckets: tuple[float, ...] | None = None
    min_keep: float = 0.0
    max_keep: float = 1.0
    eps: float = 0.05

    @classmethod
    def fit(cls, signal: str, images: Iterable[Tensor] | Tensor, mean_keep: float = 0.25,
            buckets: Iterable[float] | None = None, min_keep: float = 0.0, max_keep: float = 1.0, eps: float = 0.05,
            num_protected: int = 0) -> Budget:
        """Fit a budget on calibration data: ``images`` is a tensor or an iterable of batches of what the
        signal reads (tokens (B, N, C) as the driven reducer sees them, or images (B, 3, H, W) for ``jpeg``);
        ``num_protected`` leading tokens are class / register tokens."""
        _check_settings(signal, mean_keep, buckets, min_keep, max_keep, eps)
        batches = [images] if isinstance(images, Tensor) else list(images)
        if not batches or not all(isinstance(b, Tensor) for b in batches):
            raise ValueError("Budget.fit needs calibration data: a tensor or an iterable of tensors")
        scores = torch.cat([measure(signal, b, num_protected, eps) for b in batches]).sort().values
        if len(scores) < 2 or bool(scores[0] == scores[-1]):
            hint = " (did a vision-stage merger such as DToMe run before the reducer?)" if signal == "dtome_count" else ""
            raise ValueError(f"the {signal} signal is constant on the {len(scores)} calibration image(s){hint}; "
                             "a budget needs at least 2 images with different values")
        u = _cdf(scores, scores)
        buckets = tuple(float(k) for k in buckets) if buckets is not None else None
        fitted = _fit_buckets(u, buckets, mean_keep) if buckets else _fit_ramp(u, mean_keep, min_keep, max_keep)
        return cls(signal, float(mean_keep), tuple(scores.tolist()), fitted, buckets, float(min_keep),
                   float(max_keep), float(eps))

    def __post_init__(self):
        _check_settings(self.signal, self.mean_keep, self.buckets, self.min_keep, self.max_keep, self.eps)
        if len(self.calibration) < 2 or list(self.calibration) != sorted(self.calibration):
            raise ValueError("calibration must hold at least 2 signal values, sorted; build a Budget with Budget.fit")

    def __repr__(self) -> str:
        tiers = f", buckets={self.buckets}" if self.buckets else ""
        return (f"Budget({self.signal!r}, mean_keep={self.mean_keep}, {len(self.calibration)} calibration values"
                f"{tiers}, min_keep={self.min_keep}, max_keep={self.max_keep}, eps={self.eps})")

    def keep_for(self, scores: Tensor) -> list[float]:
        """The keep fraction of each signal value in ``scores`` (B,)."""
        u = _cdf(torch.tensor(self.calibration, dtype=torch.float64), scores.double())
        if self.buckets:
            return _bucket_keep(u, self.buckets, self.fitted).tolist()
        return _ramp_keep(u, self.fitted, self.min_keep, self.max_keep).tolist()

    def keeps(self, x: Tensor, num_protected: int = 0) -> list[float]:
        """The keep fraction of every image of ``x`` (what the signal reads, as in :meth:`fit`)."""
        return self.keep_for(measure(self.signal, x, num_protected, self.eps))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Budget:
        data = dict(data)
        data["calibration"] = tuple(data["calibration"])
        data["buckets"] = tuple(data["buckets"]) if data.get("buckets") is not None else None
        return cls(**data)


def _check_settings(signal, mean_keep, buckets, min_keep, max_keep, eps) -> None:
    if signal not in SIGNALS:
        raise ValueError(f"unknown budget signal {signal!r}; the signals are {', '.join(SIGNALS)}")
    for name, value, low in (("mean_keep", mean_keep, 0.0), ("max_keep", max_keep, 0.0), ("eps", eps, 0.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= 1:
            raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, (int, float)) or not 0 <= min_keep <= mean_keep <= max_keep:
        raise ValueError(f"the keep bounds must satisfy 0 <= min_keep <= mean_keep <= max_keep <= 1, got "
                         f"min_keep={min_keep!r}, mean_keep={mean_keep!r}, max_keep={max_keep!r}")
    if buckets is not None:
        tiers = list(buckets)
        if len(tiers) < 2 or any(isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1 for k in tiers) \
                or tiers != sorted(set(tiers)) or not tiers[0] <= mean_keep <= tiers[-1]:
            raise ValueError(f"buckets must be at least 2 increasing keep fractions in (0, 1] around mean_keep="
                             f"{mean_keep!r} (CAT-style tiers, e.g. (0.125, 0.25, 0.5)), got {buckets!r}")


def _ramp_keep(u: Tensor, top: float, min_keep: float, max_keep: float) -> Tensor:
    if math.isinf(top):
        return torch.full_like(u, max_keep)
    return (min_keep + (top - min_keep) * u).clamp(min_keep, max_keep)


def _fit_ramp(u: Tensor, mean_keep: float, min_keep: float, max_keep: float) -> float:
    """The ramp top whose calibration mean keep is ``mean_keep`` (the mean grows continuously with it)."""
    if mean_keep == max_keep:
        return math.inf
    low, high = min_keep, min_keep + 2 * (mean_keep - min_keep) / float(u.min())  # the mean at high >= mean_keep
    for _ in range(200):
        middle = (low + high) / 2
        if float(_ramp_keep(u, middle, min_keep, max_keep).mean()) < mean_keep:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def _bucket_keep(u: Tensor, buckets: tuple[float, ...], shift: float) -> Tensor:
    tiers = len(buckets)
    cuts = (torch.arange(1, tiers, dtype=torch.float64) / tiers + shift).clamp(0, 1)
    return torch.tensor(buckets, dtype=torch.float64)[(u[:, None] >= cuts).sum(dim=1)]


def _fit_buckets(u: Tensor, buckets: tuple[float, ...], mean_keep: float) -> float:
    """The cut shift whose calibration mean keep is closest to ``mean_keep`` (the mean falls as the shift grows)."""
    low, high = -1.0, 1.0  # the mean at -1 is the top tier, at 1 the bottom one
    for _ in range(60):
        middle = (low + high) / 2
        if float(_bucket_keep(u, buckets, middle).mean()) > mean_keep:
            low = middle
        else:
            high = middle
    return min((low, high), key=lambda s: abs(float(_bucket_keep(u, buckets, s).mean()) - mean_keep))


# resolving a keep --------------------------------------------------------------------------------------

def kept_counts(keep: int | float | Budget, tokens: Tensor, num_protected: int = 0) -> list[int]:
    """Tokens each image of ``tokens`` (B, N, C) keeps out of its N - ``num_protected`` candidates:
    :func:`~tokred.reducers.base.kept_count` of ``keep``, or of the image's own fraction when ``keep``
    is a :class:`Budget`. The one place a reducer's ``keep`` is resolved per image."""
    available = tokens.shape[1] - num_protected
    if isinstance(keep, Budget):
        return [kept_count(fraction, available) for fraction in keep.keeps(tokens, num_protected)]
    return [kept_count(keep, available)] * tokens.shape[0]


def padded_prefixes(order: Tensor, counts: list[int], num_inputs: int, num_protected: int = 0) -> Plan:
    """Keep plan: the first ``num_protected`` tokens, then per image b the first ``counts[b]`` indices
    of its ``order`` (B, >= max(counts)), in ascending order; narrower images are padded at the end
    (``Plan.padded``, padding entries = ``num_inputs``)."""
    width = max(counts)
    slot = torch.arange(width, device=order.device)
    wanted = torch.tensor(counts, device=order.device)[:, None]
    chosen = torch.where(slot[None] < wanted, order[:, :width], num_inputs).sort(dim=1).values
    prefix = torch.arange(num_protected, device=order.device).expand(len(counts), -1)
    return Plan(keep=torch.cat([prefix, chosen], dim=1), num_inputs=num_inputs, padded=min(counts) < width)
