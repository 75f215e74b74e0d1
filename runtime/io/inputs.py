"""What ``--images`` (and ``--calibration``) names, found before any file is read: the one discovery rule.

A folder of images, one image, a CSV/TSV/JSONL manifest, WebDataset tar shards or Parquet files, the latter two
named one by one, by a brace pattern (``DIR/{00000..04999}.tar``, braceexpand's rules), a glob, a folder holding
only them, or a text file listing them one a line. A folder holding both kinds (shards or Parquet files beside
loose images) is refused, naming one of each: scoring one kind would silently skip the other.

Also here: ``split_reference``, which reads a manifest cell ``SHARD::KEY`` / ``FILE::ROW`` (what shard and
Parquet runs write, and what ``ipiqa select`` keeps) as a reference into that file. This module reads names
and directory entries only (plus a list file's first line); ``shards`` reads tars, ``parquet_source`` Parquet.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from ipiqa.errors import IPIQAError

__all__ = ["IMAGE_SUFFIXES", "SHARD_SUFFIXES", "PARQUET_SUFFIXES", "Inputs", "discover", "expand_braces",
           "expand_inputs", "input_suffix", "is_image_name", "split_reference"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")  # read with tarfile's stream mode "r|*"
PARQUET_SUFFIXES = (".parquet",)
_PATTERN_CHARS = set("{}*?[")
_INT_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")
_CHAR_RANGE = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.(-?\d+))?$")
_REFERENCE = re.compile(r"^(.*?(?:" + "|".join(re.escape(s) for s in SHARD_SUFFIXES + PARQUET_SUFFIXES) + r"))::(.+)$",
                        re.IGNORECASE | re.DOTALL)


# -- brace patterns
def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern stands for, in braceexpand's order (the leftmost group varies slowest).

    ``{a,b}`` alternatives (empty ones too), nested (``{a,{b,c}}``); ``{00..99}`` ranges keeping zero padding
    (the width of the longer end when either starts with 0), descending ones, ``{a..e}`` letters, and a step
    (``{0..10..5}``). A backslash makes the next character literal (``\\{``). A pair without a comma or range
    (``{x}``) and an unmatched brace stay literal, as in bash (braceexpand refuses the latter; a pattern that
    matches nothing is refused by ``expand_inputs`` anyway).
    """
    return [_unescape(s) for s in _expand(pattern)]


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text, flags=re.DOTALL)


def _expand(text: str) -> Iterator[str]:
    start = 0
    while True:
        i = _next_brace(text, start)
        if i < 0:
            yield text
            return
        found = _group(text, i)
        if found is not None:
            end, options = found
            head, tail = text[:i], text[end + 1:]
            for option in options:
                for rest in _expand(option + tail):
                    yield head + rest
            return
        start = i + 1  # a literal brace: look for a group after it (or inside it)


def _next_brace(text: str, start: int) -> int:
    i = start
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == "{":
            return i
        i += 1
    return -1


def _group(text: str, i: int) -> Optional[tuple[int, list[str]]]:
    """(index of the matching ``}``, the alternatives) of the group opening at ``i``, or None when it is literal."""
    depth, j, commas = 0, i, []
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                break
        elif c == "," and depth == 1:
            commas.append(j)
        j += 1
    else:
        return None  # unmatched
    if commas:
        cuts = [i] + commas + [j]
        return j, [text[a + 1:b] for a, b in zip(cuts, cuts[1:])]
    body = text[i + 1:j]
    sequence = _sequence(body)
    return (j, sequence) if sequence is not None else None


def _sequence(body: str) -> Optional[list[str]]:
    """``00..10[..step]`` or ``a..e[..step]`` as braceexpand writes them, else None."""
    m = _INT_RANGE.match(body)
    if m:
        left, right, incr = m.groups()
        padded = any(s.startswith(("0", "-0")) for s in (left, right) if s not in ("0", "-0"))
        width = max(len(left), len(right)) if padded else 0
        lo, hi, step = int(left), int(right), abs(int(incr or 1)) or 1
        values = range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)
        return [f"{v:0{width}d}" for v in values]
    m = _CHAR_RANGE.match(body)
    if m:
        left, right, incr = m.groups()
        lo, hi, step = ord(left), ord(right), abs(int(incr or 1)) or 1
        values = range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)
        return [chr(v) for v in values]
    return None


# -- names
def input_suffix(path: Path) -> Optional[str]:
    """``shards`` or ``parquet`` for a partitioned input file by its name, else None."""
    name = path.name.lower()
    if name.endswith(SHARD_SUFFIXES):
        return "shards"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def split_reference(image: str) -> Optional[tuple[Path, str]]:
    """(file, key) when a manifest's image cell names a shard sample (``SHARD::KEY``) or a Parquet row
    (``FILE::ROW``), else None: the part before the first ``::`` that follows a shard or Parquet suffix is the
    file. A file that exists under the whole name is a file, not a reference."""
    m = _REFERENCE.match(image)
    if m is None or os.path.isfile(image):
        return None
    return Path(m.group(1)), m.group(2)


# -- discovery
@dataclass(frozen=True)
class Inputs:
    """What one ``--images`` value names."""

    kind: str  # "shards" | "parquet" | "folder" | "image" | "csv" | "jsonl"
    files: tuple[Path, ...] = ()  # the shard or Parquet files, in reading order (empty for the other kinds)
    images: Optional[int] = None  # a folder's image count (counted while it was listed)


def discover(source: str) -> Inputs:
    """The kind of input ``source`` names, refused with one line when it names nothing ipiqa reads."""
    path = Path(source)
    if path.is_dir():
        return _folder(path)
    files = expand_inputs(source)
    if files is not None:
        return Inputs(input_suffix(files[0]) or "shards", tuple(files))
    if not path.is_file():
        raise IPIQAError(f"{path}: no such folder or manifest")
    if is_image_name(path):
        return Inputs("image", images=1)
    return Inputs("jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "csv")


def _folder(path: Path) -> Inputs:
    """One listing: images counted, shard and Parquet files collected; a folder holding both is refused."""
    images, files, first_image = 0, [], None
    with os.scandir(path) as entries:
        for entry in entries:
            name = Path(entry.name)
            if is_image_name(name):
                images += 1
                first_image = first_image or Path(entry.path)
            elif input_suffix(name) is not None and entry.is_file():
                files.append(Path(entry.path))
    if images and files:
        kind = "tar shards" if input_suffix(files[0]) == "shards" else "Parquet files"
        raise IPIQAError(f"{path}: holds both {kind} ({files[0].name}, {len(files)} in all) and loose images "
                         f"({first_image.name}, {images} in all); scoring one kind would skip the other: move one "
                         f"kind to its own folder, or name it ('{path}/*.tar', a manifest)")
    if files:
        return Inputs(_kind_of(sorted(files), str(path)), tuple(sorted(files)))
    if not images:
        raise IPIQAError(f"{path}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, tar shards and "
                         "Parquet files)")
    return Inputs("folder", images=images)


def _is_list_file(path: Path) -> bool:
    """A text file whose first non-blank line names a shard or Parquet file (or a pattern of them)."""
    try:
        with open(path, "rb") as fh:
            for line in fh:
                text = line.decode("utf-8-sig", errors="replace").strip()
                if text:
                    return input_suffix(Path(expand_braces(text)[0])) is not None
    except OSError:
        return False
    return False


def _expand_one(pattern: str, missing: list[str]) -> list[Path]:
    found: list[Path] = []
    for name in expand_braces(pattern):
        if _PATTERN_CHARS & set(name) and not os.path.exists(name):
            found.extend(Path(p) for p in sorted(glob.glob(name)))  # a glob: sorted, as a shell would list it
        elif os.path.exists(name):
            found.append(Path(name))
        else:
            missing.append(name)
    return found


def expand_inputs(source: str) -> Optional[list[Path]]:
    """The shard or Parquet files ``--images`` names, or None when it names a folder of images, one image or a
    manifest. Takes a brace pattern or glob, one shard or Parquet file, a folder holding only shards or only
    Parquet files, or a text file listing them one a line (relative lines resolve against its folder)."""
    path = Path(source)
    missing: list[str] = []
    if path.is_dir():
        found = _folder(path)
        return list(found.files) if found.files else None
    if path.is_file():
        if input_suffix(path) is not None:
            files = [path]
        elif _is_list_file(path):
            files = []
            with open(path, encoding="utf-8-sig", errors="surrogateescape") as fh:
                for line in fh:
                    text = line.strip()
                    if text and not text.startswith("#"):
                        entry = text if os.path.isabs(text) else str(path.parent / text)
                        files.extend(_expand_one(entry, missing))
        else:
            return None
    elif _PATTERN_CHARS & set(source):
        files = _expand_one(source, missing)
    else:
        return None
    if missing:
        raise IPIQAError(f"{missing[0]}: no such shard or Parquet file ({len(missing)} of "
                         f"{len(missing) + len(files)} named by {source} are missing); fix the pattern or the list")
    if not files:
        raise IPIQAError(f"{source}: matches no files; --images takes a folder, a manifest, shards "
                         "('DIR/{00000..00099}.tar', a glob, or a list file) or Parquet files")
    _kind_of(files, source)
    return files


def _kind_of(files: list[Path], source: str) -> str:
    kinds = {input_suffix(p) for p in files}
    if None in kinds or len(kinds) > 1:
        odd = next((p for p in files if input_suffix(p) != input_suffix(files[0])), files[0])
        raise IPIQAError(f"{odd}: {source} must name only tar shards ({', '.join(SHARD_SUFFIXES)}) or only Parquet "
                         "files; score the others in their own run")
    return kinds.pop() or "shards"
