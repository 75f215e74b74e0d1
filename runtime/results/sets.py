"""A scores set: one scores file, or many read as one (``ipiqa report`` / ``ipiqa select`` take either).

What names a set: a scores file (.csv, .jsonl, .parquet); an ``--output-dir`` folder of per-shard score files
(``ipiqa score --images 'shards/*.tar' --output-dir scores/``), its complete files only: the hidden
``.NAME.csv.partial`` (a shard being scored, or a killed run's) and ``.NAME.csv.lock`` are left out and
counted; a glob or brace pattern of score files; or a text file listing them, one a line (patterns allowed,
relative lines resolve against its folder, ``#`` starts a comment). Files are read in name order (a folder,
a glob) or as listed, one after the other, each streamed by ``ScoresFile``: memory does not grow with the set's
rows (a set holds one ``ScoresFile``, its path and columns, per file; the commands hold what they hold for one file:
the report its capped samples and ~0.5 KB per distinct prompt, select --top-k its heaps).
Every file must have the same score columns (formats may differ); the set is refused naming two that disagree.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Collection, Iterator, Optional, Union

from ipiqa.errors import IPIQAError

from ..io.inputs import expand_braces
from .read import SCORE_SUFFIXES, ScoreRow, ScoresFile

__all__ = ["ScoresSet", "open_scores", "score_files"]

_PATTERN_CHARS = set("*?[{")


def _is_scores_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(SCORE_SUFFIXES)


def _looks_like_scores(path: Path) -> bool:
    """A file under another suffix that ``ipiqa score -o`` still wrote as CSV (``output_format``'s default)."""
    try:
        with open(path, "rb") as fh:
            return fh.readline().startswith(b"image,prompt,")
    except OSError:
        return False


def _expand(pattern: str, missing: list[str]) -> list[Path]:
    found: list[Path] = []
    for name in expand_braces(pattern):
        if os.path.exists(name):
            found.append(Path(name))
        elif _PATTERN_CHARS & set(name):
            found.extend(Path(p) for p in sorted(glob.glob(name)) if _is_scores_name(os.path.basename(p)))
        else:
            missing.append(name)
    return found


def score_files(spec: Union[str, Path]) -> tuple[list[Path], int]:
    """The score files ``spec`` names, in reading order, and how many partial files of a folder were left out."""
    text = os.fspath(spec)
    path = Path(text)
    missing: list[str] = []
    partials = 0
    if path.is_dir():
        files = []
        with os.scandir(path) as entries:
            for entry in entries:
                if _is_scores_name(entry.name) and entry.is_file():
                    files.append(Path(entry.path))
                elif entry.name.startswith(".") and entry.name.endswith(".partial"):
                    partials += 1
        files.sort()
        if not files:
            raise IPIQAError(f"{path}: holds no score files ({', '.join(SCORE_SUFFIXES)})"
                             + (f", only {partials} partial one(s) of a run still going or killed: finish it with "
                                "ipiqa score ... --output-dir again" if partials else "")
                             + "; give the folder 'ipiqa score --output-dir' wrote")
    elif path.is_file() and (path.name.lower().endswith(SCORE_SUFFIXES) or _looks_like_scores(path)):
        files = [path]
    elif path.is_file():
        files = []
        with open(path, encoding="utf-8-sig", errors="surrogateescape") as fh:
            for line in fh:
                entry = line.strip()
                if entry and not entry.startswith("#"):
                    files.extend(_expand(entry if os.path.isabs(entry) else str(path.parent / entry), missing))
        if not files and not missing:
            raise IPIQAError(f"{path}: lists no score files; a list names one scores file (or pattern) a line")
    elif _PATTERN_CHARS & set(text):
        files = _expand(text, missing)
        if not files and not missing:
            raise IPIQAError(f"{text}: matches no score files ({', '.join(SCORE_SUFFIXES)}); check the pattern")
    else:
        raise IPIQAError(f"{text}: no such scores file or folder; give the file 'ipiqa score -o' wrote or the folder "
                         "'ipiqa score --output-dir' wrote")
    if missing:
        raise IPIQAError(f"{missing[0]}: no such scores file ({len(missing)} of {len(missing) + len(files)} named by "
                         f"{text} are missing); fix the list or the pattern")
    odd = next((p for p in files if not p.is_file() or not (p.name.lower().endswith(SCORE_SUFFIXES) or
                                                           _looks_like_scores(p))), None)
    if odd is not None:
        raise IPIQAError(f"{odd}: not a scores file ({', '.join(SCORE_SUFFIXES)}), named by {text}")
    return files, partials


class ScoresSet:
    """Score files read as one, in order; the same surface as one ``ScoresFile`` (``outputs``, ``rows``,
    ``complete``), with row indices running on across files. ``path`` is what named the set."""

    def __init__(self, spec: Union[str, Path]):
        self.path = Path(spec)
        paths, self.partials = score_files(spec)
        self.files = tuple(ScoresFile(p) for p in paths)  # each checks its own columns (one line read)
        first = self.files[0]
        for f in self.files[1:]:
            if f.outputs != first.outputs:
                raise IPIQAError(f"{f.path}: its score columns {list(f.outputs)} are not {first.path}'s "
                                 f"{list(first.outputs)}; a scores set is the output of one model: report or select "
                                 "each model's files apart")
        self.outputs = first.outputs
        self.fmt = "+".join(dict.fromkeys(f.fmt for f in self.files))
        self.complete = True

    @property
    def single(self) -> bool:
        """One file named as itself (not a folder, list or pattern that happened to hold one)."""
        return len(self.files) == 1 and self.files[0].path == self.path

    @property
    def incomplete(self) -> tuple[Path, ...]:
        """Files that ended in a partial record in the last iteration (a killed run's)."""
        return tuple(f.path for f in self.files if not f.complete)

    def describe(self) -> str:
        """``scores.csv (csv)`` or ``scores/ (12 files: csv)``, for summaries."""
        if self.single:
            return f"{self.path} ({self.fmt})"
        left = f"; {self.partials} partial file(s) left out" if self.partials else ""
        return f"{self.path} ({len(self.files)} files: {self.fmt}{left})"

    def refuse_output(self, out: Path, example: str) -> None:
        """Refuse an output that is one of the set's files, or a scores file inside the set's folder (the next read
        of the folder would take it as one more file of the set). The one rule of both commands."""
        out = Path(out)
        for f in self.files:
            if out.exists() and os.path.samefile(out, f.path):
                raise IPIQAError(f"{out}: the output is {'the' if self.single else 'a'} scores file it reads; "
                                 f"choose another -o (e.g. {example})")
        if self.path.is_dir() and _is_scores_name(out.name) and os.path.abspath(out.parent) == os.path.abspath(self.path):
            raise IPIQAError(f"{out}: inside the scores folder {self.path}, it would be read as one more file of the "
                             f"set next time; write it elsewhere (e.g. -o {example})")

    def __iter__(self) -> Iterator[ScoreRow]:
        return self.rows()

    def rows(self, prompts: Optional[Collection[Optional[str]]] = None) -> Iterator[ScoreRow]:
        """Every row of every file, in order; ``prompts`` as in ``ScoresFile.rows``."""
        start = 0
        for f in self.files:
            yield from f.rows(prompts, start)
            start += f.count
        self.complete = all(f.complete for f in self.files)


def open_scores(spec: Union[str, Path]) -> ScoresSet:
    """The scores set ``spec`` names: a scores file, an ``--output-dir`` folder, a list file or a pattern."""
    return ScoresSet(spec)
