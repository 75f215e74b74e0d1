"""Prompt mixes: how many images share a prompt, the one thing that decides how often the text encoder runs.

AGIQA-3k has 10 images per prompt (the prompt cache hides the text encoder), best-of-N generation 4 to 8,
AIGCQA-20k 1.03 (the text encoder runs for nearly every image). The benchmark measures each mix it is given;
every prompt string names its run, so no run finds another run's prompts in a cache.

The prompts are AIGCQA-20k's own, in file order, behind the run's tag: the runtime cuts each text call at its
end-of-text (``short_tokens``), so the text encoder's cost follows the prompts' real lengths; the tag adds a few
tokens, so the text share measured is, if anything, above the dataset's. Without the label files the prompts are
the short tag alone, and ``prompt_source`` says so in the report.
"""
from __future__ import annotations

import csv
from functools import lru_cache

from ipiqa.errors import IPIQAError

__all__ = ["DEFAULT_MIXES", "MIX_NOTES", "parse_mixes", "prompt_for", "prompt_source", "mix_label", "text_share"]

DEFAULT_MIXES = "10"
MIX_NOTES = {1: "AIGCQA-20k-like: every prompt new, the text encoder runs for every image",
             4: "best-of-N-like: the text encoder runs once per 4 images",
             10: "AGIQA-3k-like: the prompt cache hides the text encoder"}


def parse_mixes(value: str) -> tuple[int, ...]:
    """``--images-per-prompt 1,4,10`` as positive integers in the order given, duplicates dropped."""
    mixes: list[int] = []
    for part in filter(None, (p.strip() for p in str(value).split(","))):
        if not part.isdigit() or int(part) < 1:
            raise IPIQAError(f"--images-per-prompt: {part!r} is not a positive whole number; "
                             f"write e.g. --images-per-prompt 1,4,10")
        if int(part) not in mixes:
            mixes.append(int(part))
    if not mixes:
        raise IPIQAError("--images-per-prompt is empty; write e.g. --images-per-prompt 1,4,10")
    return tuple(mixes)


@lru_cache(maxsize=1)
def _real_prompts() -> tuple[str, ...]:
    """AIGCQA-20k's prompts in file order (empty where ``../shared/datasets`` is not beside the checkout)."""
    from ipiqa.export.prompt_sets import datasets_folder

    root = datasets_folder()
    if root is None:
        return ()
    with open(root / "aigcqa-20k" / "info_train.csv", newline="", encoding="utf-8") as fh:
        return tuple(row["prompt"] for row in csv.DictReader(fh))


def prompt_for(index: int, images_per_prompt: int, run: str) -> str:
    """The prompt of image ``index`` in a run: one new prompt every ``images_per_prompt`` images, unique to ``run``
    (a backend's cache survives between batches and mixes; a shared string would be a hit it never earned), at a
    real prompt's length where the label files are there (see the module docstring)."""
    n = index // images_per_prompt
    real = _real_prompts()
    return f"{run} #{n}: {real[n % len(real)]}" if real else f"a generated image, {run}, prompt #{n}"


def prompt_source() -> str:
    """Where the prompts' text comes from, for the report's header."""
    real = _real_prompts()
    return (f"AIGCQA-20k's prompts in file order ({len(real)}), each behind its run's tag" if real
            else "short synthetic prompts (no label files in ../shared/datasets): the text encoder's share is low")


def mix_label(images_per_prompt: int) -> str:
    word = "image" if images_per_prompt == 1 else "images"
    note = MIX_NOTES.get(images_per_prompt)
    return f"{images_per_prompt} {word} per prompt" + (f" ({note})" if note else "")


def text_share(images_per_prompt: int) -> float:
    """Text-encoder passes per image under a prompt cache: what the GFLOP/img column amortizes."""
    return 1.0 / images_per_prompt
