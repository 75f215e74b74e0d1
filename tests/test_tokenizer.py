"""The torch-free tokenizer yields exactly open_clip's ids: every real prompt of the three datasets and adversarial text."""
from __future__ import annotations

import csv
import html
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ipiqa.runtime.tokenizer import ClipTokenizer

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer", reason="the reference tokenizer needs ipiqa[torch]")
DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"

ADVERSARIAL = [
    "", " ", "\t\n\r ", "🎉🔥 emoji 😀👍🏽", "日本の桜、水彩画", "中文提示词，高清", "한국어 프롬프트",
    "&amp;amp; &lt;b&gt;bold&lt;/b&gt; &#39;quoted&#39;", "cafÃ© mojibake â€™s", "x" * 10000, "word " * 3000,
    "<start_of_text> literal <end_of_text> tokens", "İstanbul ǅ ß ﬁ ＦＵＬＬＷＩＤＴＨ", "don't it's we're they'll I'd",
    "zero\u200bwidth\u00a0nbsp", "\x00\x1f control chars", "   leading and trailing   ", "MiXeD CaSe 123 4.5e6",
    "a" * 76, "a " * 76, "naïve café résumé", "🏳️‍🌈 zwj sequence", "right-to-left עברית العربية",
]


def _dataset_prompts() -> list[str]:
    prompts = []
    for name in ("agiqa-3k/data.csv", "aigcqa-20k/info_train.csv"):
        with open(DATASETS / name, newline="", encoding="utf-8") as fh:
            prompts += [row["prompt"] for row in csv.DictReader(fh)]
    with zipfile.ZipFile(DATASETS / "agiqa-1k" / "AIGC_MOS_Zscore.xlsx") as z:  # every cell text, prompts included
        shared = z.read("xl/sharedStrings.xml").decode("utf-8")
    prompts += [html.unescape(t) for t in re.findall(r"<t[^>]*>(.*?)</t>", shared, re.S)]
    return prompts


@pytest.fixture(scope="module")
def tokenizers():
    bpe = open_clip_tokenizer.default_bpe()
    return ClipTokenizer(bpe), open_clip_tokenizer.SimpleTokenizer()


@pytest.mark.skipif(not DATASETS.is_dir(), reason="../shared/datasets is not beside this checkout")
def test_ids_equal_open_clip_on_every_dataset_prompt(tokenizers):
    ours, ref = tokenizers
    prompts = _dataset_prompts()
    assert len(prompts) > 18000
    a, b = ours(prompts), ref(prompts, context_length=77).numpy()
    mismatched = [prompts[i][:80] for i in np.flatnonzero((a != b).any(axis=1))]
    assert not mismatched, f"{len(mismatched)} prompts differ, e.g. {mismatched[:3]}"


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_ids_equal_open_clip_on_adversarial_text(tokenizers, text):
    ours, ref = tokenizers
    assert np.array_equal(ours([text]), ref([text], context_length=77).numpy())


def test_none_prompt_tokenizes_as_empty(tokenizers):
    ours, _ = tokenizers
    assert np.array_equal(ours([None]), ours([""]))


def test_saved_tokenizer_file_loads_to_the_same_ids(tokenizers, tmp_path):
    ours, _ = tokenizers
    ours.save(tmp_path / "tokenizer.json")
    again = ClipTokenizer(tmp_path / "tokenizer.json")
    sample = ADVERSARIAL + ["a photo of a cat"]
    assert np.array_equal(again(sample), ours(sample))
