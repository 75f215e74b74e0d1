"""WebDataset tar shards as rows, read as a stream: one member at a time, one sample buffered.

A shard is a tar of samples; a sample is the consecutive members sharing a key, the member name up to the
first dot of its base name (WebDataset's rule: ``dir/000017.jpg`` and ``dir/000017.json`` are sample
``dir/000017`` with extensions ``jpg`` and ``json``). Each sample is one row labelled ``SHARD::KEY``; its
image is the member whose extension is an image one, read into the row's ``source`` as encoded bytes, so the
pipeline decodes bytes (with the file path's rules and errors) and never unpacks the shard to disk. The prompt
is the ``.txt`` member, else a field of the ``.json`` member, else ``--prompt``.

Cases the row rules cover here: a sample without an image, with two images or with an unreadable
``.txt``/``.json`` is an error row; a key seen before in the same shard is an error row (the first one is
scored); a shard cut short, or corrupt after some point, keeps the rows read before the cut and ends with one
error row naming the shard and the byte offset of the cut. A file that is not a tar is refused before the run.
"""
from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from ipiqa.errors import IPIQAError

from ..rows import Row, clean_prompt, resolve_prompt

__all__ = ["SHARD_IMAGE_EXTS", "SHARD_SUFFIXES", "PARQUET_SUFFIXES", "sample_key", "expand_braces", "expand_inputs",
           "input_suffix", "check_tar", "shard_rows", "truncated_label", "MAX_MEMBER_BYTES"]

SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # a sample's image member (WebDataset's usual image keys)
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")  # read with tarfile's stream mode "r|*"
PARQUET_SUFFIXES = (".parquet",)
MAX_MEMBER_BYTES = 256 << 20  # a member above this is an error row, never read into memory
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: checked when read
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_PATTERN_CHARS = set("{}*?[")


def sample_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member name: the key is the name up to the first dot of its base name; the
    extension, the rest, lower-cased (``a/b.seg.PNG`` -> ``("a/b", "seg.png")``). The one grouping rule."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def expand_braces(pattern: str) -> list[str]:
    """``{a,b}`` alternatives and ``{00000..04999}`` ranges (zero padding kept), as WebDataset's ``braceexpand``
    reads shard lists; left to right, in the order written."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    rng = _RANGE.match(body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1)) if rng.group(1).lstrip("-").startswith("0") else 0
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        return [head + "{" + body + "}" + p for p in expand_braces(tail)]  # a literal brace pair
    return [head + o + p for o in options for p in expand_braces(tail)]


def input_suffix(path: Path) -> Optional[str]:
    """``shards`` or ``parquet`` for a partitioned input file by its name, else None."""
    name = path.name.lower()
    if name.endswith(SHARD_SUFFIXES):
        return "shards"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


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
        files = []
        with os.scandir(path) as entries:
            for entry in entries:
                if _is_image_name(Path(entry.name)):
                    return None  # a folder of images: stop at the first (the folder may hold millions)
                if input_suffix(Path(entry.name)) is not None and entry.is_file():
                    files.append(Path(entry.path))
        if not files:
            return None  # nothing ipiqa reads: RowSource says so
        files.sort()
    elif path.is_file():
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
    kinds = {input_suffix(p) for p in files}
    if None in kinds or len(kinds) > 1:
        odd = next((p for p in files if input_suffix(p) != input_suffix(files[0])), files[0])
        raise IPIQAError(f"{odd}: {source} must name only tar shards ({', '.join(SHARD_SUFFIXES)}) or only Parquet "
                         "files; score the others in their own run")
    return files


def _is_image_name(p: Path) -> bool:
    from .sources import IMAGE_SUFFIXES

    return p.suffix.lower() in IMAGE_SUFFIXES


def check_tar(path: Path) -> None:
    """Refuse, before the run, a file that is not a tar shard: its first header must parse (a compressed shard's
    magic is accepted here and its tar checked as it is read)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(tarfile.BLOCKSIZE)
    except OSError as exc:
        raise IPIQAError(f"{path}: cannot read the shard ({exc.strerror or exc})") from None
    if head.startswith(_COMPRESSED_MAGIC):
        return
    why = "empty file" if not head else None
    if why is None:
        try:
            tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
            return
        except tarfile.HeaderError as exc:
            why = f"no tar header ({exc})"
    raise IPIQAError(f"{path}: not a tar shard ({why}); --images takes WebDataset .tar shards: check the file "
                     "(a partial download?) or leave it out of the list")


class _MarkedInfo(tarfile.TarInfo):
    """Records why tarfile stopped: it ends silently on a cut or garbage header past the first member, so the
    end-of-archive marker (a zero block) is the only proof that a shard is complete."""

    @classmethod
    def fromtarfile(cls, tf):  # noqa: D401 - tarfile's own hook
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            tf.ipiqa_end = None  # the zero block: a complete shard
            raise
        except tarfile.HeaderError as exc:
            tf.ipiqa_end = str(exc) or type(exc).__name__
            raise


@dataclass
class _Sample:
    key: str
    at: int  # byte offset of its first member's header
    members: dict = field(default_factory=dict)  # extension -> bytes (read) or None (not needed, not read)
    errors: list = field(default_factory=list)


def truncated_label(shard: str, offset: int) -> str:
    """The ``image`` of a cut shard's last row (deterministic, so ``--resume`` matches it)."""
    return f"{shard}::<truncated at byte {offset}>"


def _wanted(ext: str) -> bool:
    return ext in SHARD_IMAGE_EXTS or ext in ("txt", "json")


def _text(sample: _Sample, ext: str, label: str) -> Optional[str]:
    data = sample.members.get(ext)
    if data is None:
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        sample.errors.append(f"{label}.{ext}: not UTF-8 text")
        return None


def _prompt(sample: _Sample, label: str, default: Optional[str], prompt_field: str) -> Optional[str]:
    """``.txt`` first, else ``.json``'s ``prompt_field``, else ``default`` (rows.resolve_prompt's rules)."""
    own = clean_prompt(_text(sample, "txt", label))
    if own is None and "json" in sample.members:
        raw = _text(sample, "json", label)
        if raw is not None:
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                sample.errors.append(f"{label}.json: unreadable JSON ({exc.msg})")
                record = None
            if isinstance(record, dict):
                own = clean_prompt(record.get(prompt_field))
            elif record is not None:
                sample.errors.append(f"{label}.json: not a JSON object")
    return resolve_prompt(own.rstrip("\r\n") if own else own, default)


def _sample_row(shard: str, sample: _Sample, seen: dict, default: Optional[str], prompt_field: str) -> Row:
    label = f"{shard}::{sample.key}"
    if sample.key in seen:
        return Row(label, None, error=f"{label}: duplicate key (first at byte {seen[sample.key]} of the shard); "
                                      "each key names one sample: the first is scored")
    seen[sample.key] = sample.at
    prompt = _prompt(sample, label, default, prompt_field)
    images = [e for e in SHARD_IMAGE_EXTS if e in sample.members]
    if sample.errors:
        return Row(label, prompt, error="; ".join(sample.errors))
    if not images:
        found = ", ".join(sorted(sample.members)) or "nothing"
        return Row(label, prompt, error=f"{label}: no image member (found {found}); a sample's image is "
                                        f"KEY.{'/.'.join(SHARD_IMAGE_EXTS)}")
    if len(images) > 1:
        return Row(label, prompt, error=f"{label}: {len(images)} image members ({', '.join(images)}); a row scores "
                                        "one image: keep one per key")
    return Row(label, prompt, source=sample.members[images[0]])


def shard_rows(shard: str, prompt: Optional[str] = None, prompt_field: str = "prompt") -> Iterator[Row]:
    """The rows of one shard, in member order, reading one member at a time (memory: one sample)."""
    seen: dict[str, int] = {}
    sample: Optional[_Sample] = None
    tf = None
    try:
        with open(shard, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*", tarinfo=_MarkedInfo) as tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, ext = sample_key(member.name)
                if sample is not None and (key != sample.key or ext in sample.members):
                    yield _sample_row(shard, sample, seen, prompt, prompt_field)  # a repeated ext starts a new sample
                    sample = None
                if sample is None:
                    sample = _Sample(key, member.offset)
                if member.size > MAX_MEMBER_BYTES:
                    sample.members[ext] = None
                    sample.errors.append(f"{shard}::{member.name}: member of {member.size} bytes, above the "
                                         f"{MAX_MEMBER_BYTES >> 20} MiB limit")
                elif _wanted(ext):
                    sample.members[ext] = tf.extractfile(member).read()
                else:
                    sample.members[ext] = None  # named in a "no image" error, never read
            end = getattr(tf, "ipiqa_end", "the end-of-archive marker is missing")
            if end is not None:  # stopped on a cut or corrupt header, not on the marker
                raise tarfile.ReadError(end)
        if sample is not None:
            yield _sample_row(shard, sample, seen, prompt, prompt_field)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        offset = sample.at if sample is not None else int(getattr(tf, "offset", 0) or 0)
        yield Row(truncated_label(shard, offset), None,
                  error=f"{shard}: truncated or corrupt at byte {offset} ({type(exc).__name__}: {exc}); the samples "
                        "before it are scored, the rest of this shard is not: re-download or rewrite the shard")

