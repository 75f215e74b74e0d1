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

import json
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from ipiqa.errors import IPIQAError
from ipiqa.preprocess import check_encoded_size

from ..rows import Row, clean_prompt, resolve_prompt

# Discovery (suffix tables, brace patterns) lives in ``inputs``; the suffix tables are re-exported only for
# io.partitions, which still imports them from here: import them from ``inputs``.

__all__ = ["SHARD_IMAGE_EXTS", "sample_key", "check_tar", "shard_rows", "truncated_label", "MAX_MEMBER_BYTES"]

SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # a sample's image member (WebDataset's usual image keys)
MAX_MEMBER_BYTES = 256 << 20  # a member above this is an error row, never read into memory
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: checked when read


def sample_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member name: the key is the name up to the first dot of its base name; the
    extension, the rest, lower-cased (``a/b.seg.PNG`` -> ``("a/b", "seg.png")``). The one grouping rule."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


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


def _too_big(member: tarfile.TarInfo, ext: str, label: str) -> Optional[str]:
    """Why a member is not read into memory (an image above the row rules' encoded-size limit, any member above
    ``MAX_MEMBER_BYTES``), or None: checked on the header's size, before a byte of it is read."""
    if _is_image(ext):
        try:
            check_encoded_size(member.size, label)
        except IPIQAError as exc:
            return str(exc)
    if member.size > MAX_MEMBER_BYTES:
        return f"{label}: member of {member.size} bytes, above the {MAX_MEMBER_BYTES >> 20} MiB limit"
    return None


def _is_image(ext: str) -> bool:
    """WebDataset decodes a member by the last part of its extension: ``KEY.b.c.jpg`` is a JPEG."""
    return ext.rpartition(".")[2] in SHARD_IMAGE_EXTS


def _wanted(ext: str) -> bool:
    return _is_image(ext) or ext in ("txt", "json")


def _image_members(sample: _Sample) -> list[str]:
    """The sample's image members: those named ``KEY.jpg`` (one part) first, else the multi-part ones
    (``KEY.b.c.jpg``), so a ``KEY.seg.png`` mask beside ``KEY.jpg`` is not a second image."""
    images = sorted(e for e in sample.members if _is_image(e))
    plain = [e for e in images if "." not in e]
    return plain or images


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
    images = _image_members(sample)
    if sample.errors:
        return Row(label, prompt, error="; ".join(sample.errors))
    if not images:
        found = ", ".join(sorted(sample.members)) or "nothing"
        return Row(label, prompt, error=f"{label}: no image member (found {found}); a sample's image is "
                                        f"KEY.{'/.'.join(SHARD_IMAGE_EXTS)} (or KEY.anything.jpg)")
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
                tf.members = []  # stream mode keeps every TarInfo (~450 B each) otherwise: webdataset clears it too
                if not member.isfile():
                    continue
                key, ext = sample_key(member.name)
                if sample is not None and (key != sample.key or ext in sample.members):
                    yield _sample_row(shard, sample, seen, prompt, prompt_field)  # a repeated ext starts a new sample
                    sample = None
                if sample is None:
                    sample = _Sample(key, member.offset)
                too_big = _too_big(member, ext, f"{shard}::{member.name}")
                if too_big is not None:
                    sample.members[ext] = None
                    sample.errors.append(too_big)
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

