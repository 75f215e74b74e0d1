"""Prompt-embedding cache: the text encoder runs once per distinct prompt (datasets hold ~10 images each)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import numpy as np

__all__ = ["PromptCache"]


class PromptCache:
    """LRU over token-id rows; bounded by entry count (one entry = one embedding, 4 KB for RN50)."""

    def __init__(self, max_entries: int = 16384):
        if max_entries < 1:
            raise ValueError(f"cache size must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._store: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def lookup(self, tokens: np.ndarray, encode: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """(B, L) ids -> (B, E) embeddings; ``encode`` runs once on the distinct rows not cached."""
        keys = [row.tobytes() for row in np.ascontiguousarray(tokens, dtype=np.int64)]
        todo = list(dict.fromkeys(k for k in keys if k not in self._store))
        if todo:
            new = encode(np.stack([np.frombuffer(k, dtype=np.int64) for k in todo]))
            for k, emb in zip(todo, np.asarray(new, dtype=np.float32)):
                self._store[k] = emb
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        out = np.stack([self._store[k] for k in keys])
        for k in dict.fromkeys(keys):
            self._store.move_to_end(k)
        while len(self._store) > self.max_entries:
            self._store.popitem(last=False)
        return out
