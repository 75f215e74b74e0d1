"""Console helpers shared by the ipiqa, ipiqa-export and ipiqa train commands."""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import click

from .errors import IPIQAError

__all__ = ["EXIT_ROW_ERRORS", "friendly", "format_table"]

EXIT_ROW_ERRORS = 3  # the run finished, but some rows are error rows


def friendly(fn: Callable) -> Callable:
    """Expected failures print one line naming the file and the fix, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except IPIQAError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in header]] + [["" if c is None else (f"{c:.4f}" if isinstance(c, float) else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
