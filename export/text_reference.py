"""The FP32 text embeddings the text gates compare against, computed once per export.

Why: the INT8 text gate (at each ``reduce_range`` it tries) and the BF16 text gate judge the same prompts against
the same FP32 graph; on RN50 that reference is most of a gate's time over the 15,738 dataset prompts (several
minutes on 2 cores), so an export with ``--int8-text --bf16-text`` computed it two or three times. Here it runs
once, through the runtime's own ``OrtBackend`` FP32, into an unnamed temporary file (``np.memmap``: memory flat
in the number of prompts; the file is gone when the reference is), and every later gate reads it back.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

__all__ = ["TextReference"]

Tokenize = Callable[[list], np.ndarray]  # prompts -> int64 (B, context_length)


class TextReference:
    """FP32 text embeddings of ``prompts``, ``batch`` at a time: ``batches()`` yields (start, tokens, embeddings)."""

    def __init__(self, fp32: Mapping[str, Path], prompts: Sequence[str], tokenize: Tokenize, batch: int = 64) -> None:
        self.fp32 = {name: Path(path) for name, path in fp32.items()}
        self.prompts, self.tokenize, self.batch = list(prompts), tokenize, batch
        self.computed = 0  # how many times the FP32 graph ran over the prompts (the tests read it)
        self._rows: Optional[np.memmap] = None
        self._file = None

    def _tokens(self, start: int) -> np.ndarray:
        return np.asarray(self.tokenize(self.prompts[start:start + self.batch]), np.int64)

    def _compute(self) -> np.memmap:
        from .graph_runs import graph_backend

        with graph_backend(dict(self.fp32)) as ref:
            for start in range(0, len(self.prompts), self.batch):
                emb = np.asarray(ref.encode_text(self._tokens(start)), np.float32)
                if self._rows is None:
                    self._file = tempfile.TemporaryFile(prefix="ipiqa-text-reference-")
                    self._rows = np.memmap(self._file, np.float32, "w+", shape=(len(self.prompts), emb.shape[1]))
                self._rows[start:start + len(emb)] = emb
        self.computed += 1
        return self._rows

    def batches(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """The first call runs the FP32 text graph over every prompt (into the file); every call then reads it."""
        rows = self._rows if self._rows is not None else (self._compute() if self.prompts else None)
        for start in range(0, len(self.prompts), self.batch):
            yield start, self._tokens(start), np.asarray(rows[start:start + self.batch])
