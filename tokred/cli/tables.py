"""The one table formatter of tokred's reports: a GitHub Markdown table, padded so that it also
reads as aligned columns in a terminal (``tokred bench``, ``tokred sweep`` and the scripts in
``evals/`` all print through :func:`markdown`)."""
from __future__ import annotations

from collections.abc import Sequence


def markdown(rows: Sequence[Sequence[object]], columns: Sequence[str], align: str | None = None) -> str:
    """``rows`` (sequences of cells, ``str()`` of each is shown; ``None`` shows as ``n/a``) under the
    ``columns`` headers, as a Markdown table. ``align``: one letter per column, ``l`` or ``r``
    (default: the first column left, the others right). ``|`` inside a cell is escaped."""
    if align is None:
        align = "l" + "r" * (len(columns) - 1)
    if len(align) != len(columns) or set(align) - {"l", "r"}:
        raise ValueError(f"align needs one of 'l' / 'r' per column ({len(columns)}), got {align!r}")
    cells = [[_cell(value) for value in row] for row in rows]
    for number, row in enumerate(cells):
        if len(row) != len(columns):
            raise ValueError(f"row {number} has {len(row)} cells for {len(columns)} columns")
    header = [_cell(name) for name in columns]
    widths = [max(3, *(len(row[i]) for row in [header, *cells])) for i in range(len(columns))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if a == "r" else "-" * (w + 2) for w, a in zip(widths, align)) + "|"
    return "\n".join([line(header), rule, *map(line, cells)])


def percent(value: float | None, digits: int = 2) -> str:
    """0.9722 -> ``97.22%``; None -> ``n/a``."""
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def _cell(value: object) -> str:
    return "n/a" if value is None else str(value).replace("|", "\\|")
