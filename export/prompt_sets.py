"""The real prompts the text gates judge on: every prompt of the three label files in ``../shared/datasets/``
(AGIQA-1k, AGIQA-3k, AIGCQA-20k), read one way for the tokenizer test and the INT8 text gate. Torch-free."""
from __future__ import annotations

import csv
import html
import os
import re
import zipfile
from pathlib import Path
from typing import Optional

__all__ = ["DATASETS", "dataset_prompts", "distinct_prompts", "datasets_folder"]

# Beside the checkout (``../shared/datasets``); ``$IPIQA_PROMPT_DATASETS`` names another folder.
DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
LABEL_FILES = ("agiqa-3k/data.csv", "aigcqa-20k/info_train.csv", "agiqa-1k/AIGC_MOS_Zscore.xlsx")


def datasets_folder() -> Optional[Path]:
    """The folder holding the three label files, or None when any of them is missing."""
    root = Path(os.environ.get("IPIQA_PROMPT_DATASETS", DATASETS))
    return root if all((root / f).is_file() for f in LABEL_FILES) else None


def dataset_prompts(root: Path = DATASETS) -> list[str]:
    """Every prompt string of the three label files, in file order, duplicates kept (18,784 strings): the two
    CSVs' ``prompt`` column and every cell text of AGIQA-1k's workbook (its prompts among them)."""
    prompts = []
    for name in LABEL_FILES[:2]:
        with open(root / name, newline="", encoding="utf-8") as fh:
            prompts += [row["prompt"] for row in csv.DictReader(fh)]
    with zipfile.ZipFile(root / LABEL_FILES[2]) as z:  # every cell text, prompts included
        shared = z.read("xl/sharedStrings.xml").decode("utf-8")
    prompts += [html.unescape(t) for t in re.findall(r"<t[^>]*>(.*?)</t>", shared, re.S)]
    return prompts


def distinct_prompts(root: Path = DATASETS) -> list[str]:
    """``dataset_prompts`` without repeats, first occurrence kept (15,725 strings)."""
    return list(dict.fromkeys(dataset_prompts(root)))
