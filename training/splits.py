"""80/20 splits grouped so no prompt (AGIQA-3k, AIGCQA-20k) or object pair (AGIQA-1k) straddles them.

Split 0 with seed 42 reproduces the authors' first split exactly: AGIQA-3k draws 240 of the 300 prompt
indices with ``np.random.seed(seed); np.random.permutation(300)``; AGIQA-1k sends each new group to
training when ``random.random() < 0.8`` after ``random.seed(seed)``, in file order. Repeats use the
seeds ``seed, seed + 1, ...`` (the authors' repeats continued one global stream, which depends on
everything else their script drew; fresh seeds make each split reproducible on its own).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .data import Sample

__all__ = ["Split", "group_of", "make_split", "make_splits", "write_split", "read_split"]


@dataclass(frozen=True)
class Split:
    dataset: str
    seed: int
    train: tuple[str, ...]
    test: tuple[str, ...]


def group_of(dataset: str, sample: Sample) -> str:
    stem = Path(sample.image).stem
    if dataset == "agiqa-3k":
        return str(int(stem.split("_")[-1]))  # AttnGAN_normal_012 -> 12: the prompt index 0..299
    if dataset == "agiqa-1k":
        parts = stem.split("_")
        code1, code2 = int(parts[1]), int(parts[2])
        if stem.startswith("dream"):  # the authors' remap: both generators' images of one object pair share a group
            code1 = code1 + 1 if code1 > 5 else code1
            code2 += 5
        return f"{code1}_{code2}"
    return sample.prompt  # AIGCQA-20k and custom CSVs: group by prompt text


def make_split(dataset: str, samples: Sequence[Sample], seed: int) -> Split:
    train, test = [], []
    if dataset == "agiqa-3k":
        rs = np.random.RandomState(seed)
        chosen = set(rs.permutation(300)[: int(0.8 * 300)].tolist())
        for s in samples:
            (train if int(group_of(dataset, s)) in chosen else test).append(s.image)
    else:
        rng = random.Random(seed)
        side: dict[str, bool] = {}
        for s in samples:
            g = group_of(dataset, s)
            if g not in side:
                side[g] = rng.random() < 0.8
            (train if side[g] else test).append(s.image)
    return Split(dataset, seed, tuple(train), tuple(test))


def make_splits(dataset: str, samples: Sequence[Sample], seed: int = 42, repeats: int = 10) -> list[Split]:
    return [make_split(dataset, samples, seed + k) for k in range(repeats)]


def write_split(split: Split, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"dataset": split.dataset, "seed": split.seed, "train": list(split.train),
                                "test": list(split.test)}, indent=1) + "\n")
    return path


def read_split(path: Path) -> Split:
    data = json.loads(Path(path).read_text())
    return Split(data["dataset"], data["seed"], tuple(data["train"]), tuple(data["test"]))
