"""Prompt mixes: how many images share a prompt, the one thing that decides how often the text encoder runs.

AGIQA-3k has 10 images per prompt (the prompt cache hides the text encoder), best-of-N generation 4 to 8,
AIGCQA-20k 1.03 (the text encoder runs for nearly every image). The benchmark measures each mix it is given;
every prompt string names its run, so no run finds another run's prompts in a cache.
"""
from __future__ import annotations

from ipiqa.errors import IPIQAError

__all__ = ["DEFAULT_MIXES", "MIX_NOTES", "parse_mixes", "prompt_for", "mix_label", "text_share"]

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


def prompt_for(index: int, images_per_prompt: int, run: str) -> str:
    """The prompt of image ``index`` in a run: one new prompt every ``images_per_prompt`` images, unique to ``run``
    (a backend's cache survives between batches and mixes; a shared string would be a hit it never earned)."""
    return f"a generated image, {run}, prompt #{index // images_per_prompt}"


def mix_label(images_per_prompt: int) -> str:
    word = "image" if images_per_prompt == 1 else "images"
    note = MIX_NOTES.get(images_per_prompt)
    return f"{images_per_prompt} {word} per prompt" + (f" ({note})" if note else "")


def text_share(images_per_prompt: int) -> float:
    """Text-encoder passes per image under a prompt cache: what the GFLOP/img column amortizes."""
    return 1.0 / images_per_prompt
