"""CLIP's BPE tokenizer without torch: HF ``tokenizers`` built from open_clip's own vocabulary file.

Ids equal ``open_clip.tokenizer.SimpleTokenizer`` (tested on every prompt of the three datasets and on
adversarial strings): the same clean-up in Python (ftfy, ``html.unescape`` twice, whitespace collapse,
lowercase), CLIP's split regex, byte-level BPE with ``</w>`` word ends, ``[SOT] ids [EOT]`` truncated
to the context with end-of-text kept last, zero padded.
"""
from __future__ import annotations

import gzip
import html
from pathlib import Path
from typing import Optional, Sequence, Union

import ftfy
import numpy as np
import tokenizers as tk

__all__ = ["clean_text", "build_clip_tokenizer", "ClipTokenizer", "SOT_ID", "EOT_ID"]

SOT, EOT = "<start_of_text>", "<end_of_text>"
SOT_ID, EOT_ID = 49406, 49407
SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clean_text(text: str) -> str:
    """open_clip's 'lower' clean: ftfy.fix_text, html.unescape twice, strip, collapse whitespace, lowercase."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_clip_tokenizer(bpe_path: Union[str, Path]):
    """A ``tokenizers.Tokenizer`` equal to CLIP's BPE, from ``bpe_simple_vocab_16e6.txt.gz``."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    base = list(_bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + [SOT, EOT]
    model = tk.models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, end_of_word_suffix="</w>",
                          fuse_unk=False)
    tokenizer = tk.Tokenizer(model)
    tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(SPLIT), behavior="removed", invert=True),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.add_special_tokens([SOT, EOT])  # a literal "<start_of_text>" in a prompt maps to its id, as in CLIP
    return tokenizer


class ClipTokenizer:
    """Prompts -> (B, context_length) int64 ids."""

    def __init__(self, path: Union[str, Path], context_length: int = 77):
        path = Path(path)
        if path.suffix == ".json":
            self._tok = tk.Tokenizer.from_file(str(path))
        else:
            self._tok = build_clip_tokenizer(path)
        self.context_length = context_length

    def save(self, path: Union[str, Path]) -> None:
        self._tok.save(str(path))

    def __call__(self, prompts: Sequence[Optional[str]]) -> np.ndarray:
        encoded = self._tok.encode_batch([clean_text(p or "") for p in prompts], add_special_tokens=False)
        out = np.zeros((len(prompts), self.context_length), dtype=np.int64)
        for row, enc in zip(out, encoded):
            ids = [SOT_ID, *enc.ids[: self.context_length - 2], EOT_ID]
            row[: len(ids)] = ids
        return out
