"""Console helpers shared by the ipiqa, ipiqa-export and ipiqa train commands.

Every wrong input ends in one line and exit status 1 (``friendly``: an IPIQAError raised by the command) or 2
(click's usage errors: a bad option value, including the checks of ``InputPath`` and ``text_option``), never in a
traceback.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import click

from .errors import IPIQAError

__all__ = ["EXIT_ROW_ERRORS", "friendly", "format_table", "InputPath", "ImagesPath", "text_option", "device_option"]

EXIT_ROW_ERRORS = 3  # the run finished, but some rows are error rows


def friendly(fn: Callable) -> Callable:
    """Expected failures print one line naming the file and the fix, never a traceback.

    An IPIQAError (bad input, bad file, bad config value, missing extra) is printed as it is. An OSError about a
    file the command was pointed at (permission denied, disk full, read-only folder) is printed with its file name.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except IPIQAError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            if exc.filename is None:  # not about a named file: a bug or the system; keep the traceback
                raise
            raise click.ClickException(f"{exc.filename}: {exc.strerror or exc}") from None

    return wrapper


class InputPath(click.Path):
    """``click.Path`` for files the command reads: also refuses, when the path exists, anything that is neither
    a regular file nor (where ``dir_okay``) a folder: a FIFO would block the read, a device node must not be opened.
    """

    def convert(self, value, param, ctx):
        path = super().convert(value, param, ctx)
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return path  # missing: click's own ``exists`` check (or the command) reports it
        import stat

        if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
            return path  # click refused a folder already unless dir_okay
        from .preprocess import _not_regular  # the one wording of "not a regular file"

        self.fail(f"{click.format_filename(path)!r} {_not_regular(mode)}", param, ctx)


class ImagesPath(InputPath):
    """``--images`` (and ``ipiqa-export --calibration``): a path (checked as ``InputPath`` does), or a shard
    pattern (braces, glob) that RowSource expands; a pattern is not a file, so it is passed on as written."""

    def convert(self, value, param, ctx):
        text = os.fsdecode(value) if isinstance(value, (bytes, os.PathLike)) else str(value)
        if set("{}*?[") & set(text) and not os.path.lexists(text):
            return Path(text)
        return super().convert(value, param, ctx)


def text_option(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
    """Callback for options taking free text: refuses text that is not valid Unicode (bytes the shell passed that
    are not UTF-8 arrive as lone surrogates and would fail later, row by row)."""
    for text in (value if isinstance(value, (tuple, list)) else (value,)):
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise click.BadParameter(f"{ascii(text)} is not valid UTF-8 text; retype it (check the terminal's "
                                         "encoding)") from None
    return value


def device_option(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
    """Callback for ``--device``: the one device rule (``ipiqa.device.parse_device``) applied while the command
    line is read, so ``--device cuda:x`` is a usage error before any model loads. The text is passed on as given."""
    text_option(ctx, param, value)
    if value is not None:
        from .device import parse_device

        try:
            parse_device(value)
        except IPIQAError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in header]] + [["" if c is None else (f"{c:.4f}" if isinstance(c, float) else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
