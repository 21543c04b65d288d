"""Per-layer merge schedules: how many tokens each layer removes."""
from __future__ import annotations

from collections.abc import Sequence


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_schedule(r) -> None:
    """Raise a clear error unless ``r`` is an int, an (r, inflection) pair or a list of ints."""
    allowed = "an int >= 0, an (r, inflection) tuple with -1 <= inflection <= 1, or a list of ints >= 0"
    if _is_int(r):
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}; r is {allowed}")
    elif isinstance(r, tuple):
        if len(r) != 2 or not _is_int(r[0]) or not isinstance(r[1], (int, float)) or isinstance(r[1], bool):
            raise TypeError(f"r={r!r} is not a valid schedule; r is {allowed}")
        if r[0] < 0 or not -1.0 <= r[1] <= 1.0:
            raise ValueError(f"r={r!r} is out of range; r is {allowed}")
    elif isinstance(r, Sequence) and not isinstance(r, (str, bytes)):
        bad = [v for v in r if not _is_int(v) or v < 0]
        if bad:
            raise ValueError(f"r list has invalid entries {bad}; r is {allowed}")
    else:
        raise TypeError(f"r={r!r} ({type(r).__name__}) is not a valid schedule; r is {allowed}")


def per_layer(r, num_layers: int) -> list[int]:
    """Expand a schedule to one r per layer.

    * int: the same r in every layer.
    * (r, inflection): a linear ramp from r*(1-inflection) to r*(1+inflection) across the layers,
      truncated to ints, so the total stays about r * num_layers (ToMe's schedule; inflection 0 is
      constant, negative removes more early, positive more late).
    * list: one r per layer; a shorter list is padded with zeros, a longer one is an error.
    """
    check_schedule(r)
    if _is_int(r):
        return [r] * num_layers
    if isinstance(r, tuple):
        base, inflection = r
        first = int(base * (1.0 - inflection))
        last = 2 * base - first
        step = (last - first) / (num_layers - 1) if num_layers > 1 else 0.0
        return [int(first + step * i) for i in range(num_layers)]
    r = list(r)
    if len(r) > num_layers:
        raise ValueError(f"the r schedule has {len(r)} entries but the model has only {num_layers} blocks")
    return r + [0] * (num_layers - len(r))
