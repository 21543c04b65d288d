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


def dymu_schedule(r: int, num_layers: int, reverse: bool = False) -> list[int]:
    """DyMU's ``linear`` schedule (``reverse_linear`` with ``reverse``): M = r * L tokens over the L
    layers, decreasing from r0 = floor(2M / L) in steps of r0 / L: layer k removes floor(r0 - k r0 / L)
    while that keeps the running sum below M, then the remainder, then 0 (M = 24, L = 4: 12, 9, 3, 0;
    reversed 0, 3, 9, 12). Raises ``ValueError`` when the ramp cannot remove M tokens (small r over
    many layers)."""
    if not _is_int(r) or r < 0:
        raise ValueError(f"r must be an int >= 0 for DyMU's linear schedules, got {r!r}")
    total = r * num_layers
    first = 2 * total // num_layers if num_layers else 0
    out, left = [], total
    for k in range(num_layers):
        out.append(min(first * (num_layers - k) // num_layers, left))  # floor(r0 - k r0 / L), in integers
        left -= out[-1]
    if left:
        raise ValueError(f"DyMU's linear schedule with r={r} over {num_layers} layers removes only {total - left} of "
                         f"the r * L = {total} tokens asked; use a larger r, the constant schedule or a list of "
                         "r per layer")
    return out[::-1] if reverse else out
