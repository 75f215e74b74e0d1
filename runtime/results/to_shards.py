"""``ipiqa select ... --to-shards DIR``: the kept samples as new WebDataset shards, copied member by member.

How a dataset is filtered by score without unpacking it (DataComp's resharder, NeMo Curator's
``to_webdataset``). Each kept row is ``SHARD::KEY`` (what a shard run writes); its sample is every member
of that shard whose key is KEY (``io.shards.sample_key``, the grouping rule the scorer used: the first sample
of a key, as the scorer scored only the first), copied as is (image, .txt, .json, anything else), plus one
member ``KEY.scores.json``: ``{"source": "SHARD::KEY", "prompt": ..., "scores": {"quality": ...}}``
(replacing a ``scores.json`` member the sample already had, so selecting from a selection keeps one).

Streamed: the kept rows of one source shard are gathered while the scores set lists them (a shard run
lists each shard's rows together), then that shard is read once, start to end, and each member is copied
to the output as it passes (memory: one shard's kept keys and scores, never a member). A shard whose rows
come back later in the set is read again, and counted. Output shards ``DIR/00000.tar``, ``00001.tar``, ...
hold ``shard_size`` samples each, in the scores set's order; a key already in the shard being written
starts the next one (keys stay unique within a shard, as WebDataset readers need). Each is written as
``00000.tar.partial`` and renamed when complete; a run that fails removes every file it wrote.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional, Sequence

from ipiqa.errors import IPIQAError

from ..io.shards import sample_key
from .read import ScoreRow, shard_of

__all__ = ["SCORES_EXT", "ShardsResult", "ShardsWriter"]

SCORES_EXT = "scores.json"  # the member each written sample gains: KEY.scores.json
DEFAULT_SHARD_SIZE = 10_000  # samples per output shard (DataComp's and img2dataset's usual size)


@dataclass(frozen=True)
class ShardsResult:
    """What ``--to-shards`` wrote: the folder, its shards, samples and members, and the source shards read
    (``reread``: reads of a shard met again later in the set)."""

    folder: Path
    shards: int
    samples: int
    members: int
    sources: int
    reread: int


class ShardsWriter:
    """Takes the kept rows in order (``add``), writes their samples; ``close`` finishes, ``abort`` removes all."""

    def __init__(self, folder: Path, outputs: Sequence[str], shard_size: int = DEFAULT_SHARD_SIZE,
                 images_root: Optional[Path] = None):
        if shard_size < 1:
            raise IPIQAError(f"--shard-size {shard_size}: a shard holds at least 1 sample")
        self.folder, self.outputs, self.shard_size, self.root = Path(folder), tuple(outputs), shard_size, images_root
        if self.folder.exists() and not self.folder.is_dir():
            raise IPIQAError(f"{self.folder}: --to-shards names a folder; it is a file")
        if self.folder.is_dir() and any(n.endswith((".tar", ".tar.partial")) for n in os.listdir(self.folder)):
            raise IPIQAError(f"{self.folder}: already holds shards; --to-shards writes a new dataset: choose an empty "
                             "or new folder")
        self.written: list[Path] = []
        self.samples = self.members = self.sources = self.reread = 0
        self._group: Optional[Path] = None  # the source shard whose kept rows are being gathered
        self._pending: dict[str, ScoreRow] = {}
        self._read: set[Path] = set()
        self._tar: Optional[tarfile.TarFile] = None
        self._fh: Optional[IO[bytes]] = None
        self._keys: set[str] = set()

    # -- rows in
    def add(self, row: ScoreRow) -> None:
        found = shard_of(row.image, self.root)
        if found is None:
            raise IPIQAError(f"{row.image}: not a shard sample (SHARD::KEY); --to-shards copies samples of "
                             "WebDataset shards: select from a run over shards, or write a manifest with -o")
        shard, key = found
        if shard != self._group:
            self._flush()
            self._group = shard
        if key in self._pending:
            raise IPIQAError(f"{row.image}: listed twice in the scores set; a sample is written once: leave the "
                             "repeated score file out of the list")
        self._pending[key] = row

    def close(self) -> ShardsResult:
        self._flush()
        self._finish_shard()
        return ShardsResult(self.folder, len(self.written), self.samples, self.members, self.sources, self.reread)

    def abort(self) -> None:
        """Remove whatever this run wrote (the shard being written and the finished ones)."""
        if self._tar is not None:
            try:
                self._tar.close()
                self._fh.close()
            except OSError:
                pass
            self._tar = None
        for p in self._partial_and_written():
            p.unlink(missing_ok=True)

    # -- one source shard, read once
    def _flush(self) -> None:
        if self._group is None or not self._pending:
            return
        shard, pending = self._group, self._pending
        self._pending, self._group = {}, None
        if not shard.is_file():
            first = next(iter(pending.values()))
            raise IPIQAError(f"{shard}: the shard of {first.image} is not there; run where the scoring run ran, or "
                             "pass --images-root FOLDER")
        self.reread += shard in self._read
        self._read.add(shard)
        self.sources += 1
        missing = self._copy(shard, pending)
        if missing:
            raise IPIQAError(f"{shard}: {len(missing)} kept sample(s) not found in the shard (first: {missing[0]}); "
                             "it changed since it was scored: score it again")

    def _copy(self, shard: Path, pending: dict[str, ScoreRow]) -> list[str]:
        """Copy the pending samples' members as the shard streams past; the keys it did not hold."""
        key: Optional[str] = None
        exts: set[str] = set()
        copying: Optional[ScoreRow] = None
        mtime = 0
        try:
            with open(shard, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tf:
                for member in tf:
                    tf.members.clear()  # stream mode keeps every TarInfo otherwise (~450 B a member)
                    if not member.isfile():
                        continue
                    k, ext = sample_key(member.name)
                    if k != key or ext in exts:  # a new sample (a repeated extension starts one, as for the scorer)
                        if copying is not None:
                            self._scores_member(key, copying, mtime)
                        key, exts = k, set()
                        copying = pending.pop(k, None)  # popped: a later sample of the key is never copied
                        if copying is not None:
                            self._begin_sample(k)
                    exts.add(ext)
                    if copying is not None and ext != SCORES_EXT:
                        info = tarfile.TarInfo(member.name)
                        info.size, info.mtime, info.mode = member.size, member.mtime, 0o644
                        mtime = member.mtime
                        self._tar.addfile(info, tf.extractfile(member))
                        self.members += 1
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            if copying is not None:  # cut inside a kept sample: the shard changed since it was scored
                raise IPIQAError(f"{shard}: truncated or corrupt inside {shard}::{key} ({type(exc).__name__}: {exc}); "
                                 "it changed since it was scored: score it again") from None
            copying = None  # a cut after the kept samples: the scorer made it an error row, never kept
        if copying is not None:
            self._scores_member(key, copying, mtime)
        return [f"{shard}::{k}" for k in pending]

    # -- output shards
    def _begin_sample(self, key: str) -> None:
        if self._tar is not None and (len(self._keys) >= self.shard_size or key in self._keys):
            self._finish_shard()
        if self._tar is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._fh = open(self._partial(), "wb")
            self._tar = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.PAX_FORMAT)
            self._keys = set()
        self._keys.add(key)
        self.samples += 1

    def _scores_member(self, key: str, row: ScoreRow, mtime: int) -> None:
        body = json.dumps({"source": row.image, "prompt": row.prompt,
                           "scores": dict(zip(self.outputs, row.scores or ()))}, ensure_ascii=False).encode("utf-8")
        info = tarfile.TarInfo(f"{key}.{SCORES_EXT}")
        info.size, info.mtime, info.mode = len(body), mtime, 0o644
        self._tar.addfile(info, io.BytesIO(body))
        self.members += 1

    def _partial(self) -> Path:
        return self.folder / f"{len(self.written):05d}.tar.partial"

    def _finish_shard(self) -> None:
        """Close the shard being written, fsync it, rename it into place."""
        if self._tar is None:
            return
        partial = self._partial()
        self._tar.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._tar = self._fh = None
        final = partial.with_name(partial.name[: -len(".partial")])
        os.replace(partial, final)
        self.written.append(final)

    def _partial_and_written(self) -> list[Path]:
        return [self._partial(), *self.written]
