"""The FP32 text embeddings the text gates compare against, computed once per export.

Why: the INT8 text gate (at each ``reduce_range`` it tries) and the BF16 text gate judge the same prompts against
the same FP32 graph; on RN50 that reference is most of a gate's time over the 15,738 dataset prompts (several
minutes on 2 cores), so an export with ``--int8-text --bf16-text`` computed it two or three times. Here it runs
once, through the runtime's own ``OrtBackend`` FP32, into an unnamed temporary file (``np.memmap``: memory flat
in the number of prompts; the file is gone when the reference is), and every later gate reads it back.
"""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

__all__ = ["TextReference", "prompt_digest"]

Tokenize = Callable[[list], np.ndarray]  # prompts -> int64 (B, context_length)


def prompt_digest(prompts: Sequence[str]) -> str:
    """What a text stage's reuse key and the export's reference memo name a prompt list by."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


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
        """Every row into a fresh file, kept only once all are written: a failure leaves nothing half-filled."""
        from .graph_runs import batches as slices, graph_backend

        file, rows = None, None
        try:
            with graph_backend(dict(self.fp32)) as ref:
                for part in slices(len(self.prompts), self.batch):
                    emb = np.asarray(ref.encode_text(self._tokens(part.start)), np.float32)
                    if rows is None:
                        file = tempfile.TemporaryFile(prefix="ipiqa-text-reference-")
                        rows = np.memmap(file, np.float32, "w+", shape=(len(self.prompts), emb.shape[1]))
                    rows[part] = emb
        except BaseException:
            if file is not None:
                file.close()
            raise
        self._file, self._rows = file, rows
        self.computed += 1
        return rows

    def close(self) -> None:
        """The file goes (the export calls this after its last text stage); a later ``batches()`` recomputes."""
        self._rows = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def batches(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """The first call runs the FP32 text graph over every prompt (into the file); every call then reads it."""
        from .graph_runs import batches as slices

        rows = self._rows if self._rows is not None else (self._compute() if self.prompts else None)
        for part in slices(len(self.prompts), self.batch):
            yield part.start, self._tokens(part.start), np.asarray(rows[part])

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """A gate handed this reference judges exactly its prompts (the worst one is named by its index)."""
        if list(prompts) != self.prompts:
            raise ValueError("the text reference was computed over other prompts than the gate's")
