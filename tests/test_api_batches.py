"""``Scorer.score`` runs a list of any length in batches, like a file run: bounded read-ahead, one failing batch
marks only its own rows; and an image-only model scores a manifest that has no prompt column."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, make_image, read_csv
from ipiqa.errors import IPIQAError
from ipiqa.runtime.scorer import Scorer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    return [make_image(root / f"{i}.png", seed=i) for i in range(7)]


def test_a_failing_batch_marks_only_its_own_rows(scorer, files, monkeypatch):
    real = scorer.score_arrays
    calls = []

    def second_batch_fails(images, prompts):
        calls.append(len(images))
        if len(calls) == 2:
            raise RuntimeError("engine lost")
        return real(images, prompts)

    monkeypatch.setattr(scorer, "score_arrays", second_batch_fails)
    records = scorer.score(files, ["a cat"] * len(files), batch_size=3)
    assert calls == [3, 3, 1]
    assert [r["error"] is None for r in records] == [True, True, True, False, False, False, True]
    assert all("scoring failed: RuntimeError: engine lost" in r["error"] for r in records[3:6])


def test_the_list_is_scored_in_batches_of_batch_size(scorer, files, monkeypatch):
    sizes = []
    real = scorer.score_arrays
    monkeypatch.setattr(scorer, "score_arrays", lambda x, p: sizes.append(len(x)) or real(x, p))
    scorer.score(files, ["a cat"] * len(files), batch_size=2)
    assert sizes == [2, 2, 2, 1]


def test_a_generator_is_read_a_bounded_distance_ahead(scorer, files):
    pulled = []

    def images():
        for i in range(200):
            pulled.append(i)
            yield files[i % len(files)]

    stream = scorer.iter_score(images(), (f"prompt {i}" for i in range(200)), batch_size=4)
    first = next(stream)
    assert first["error"] is None
    assert len(pulled) <= 4 * 4  # the batch being scored, the decode depth (2) and the batch being read
    rest = list(stream)
    assert len(rest) == 199 and len(pulled) == 200


def test_paths_pil_images_and_arrays_score_alike(scorer, files):
    from ipiqa.preprocess import load_resized

    pil = Image.open(files[0]).convert("RGB")
    array = load_resized(str(files[0]), scorer.resolution)
    a, b, c = scorer.score([files[0], pil, array], ["a cat"] * 3)
    assert a["error"] is b["error"] is c["error"] is None
    assert a["quality"] == b["quality"] == c["quality"]  # the same pixels through the same batch


def test_an_array_of_the_wrong_shape_is_that_rows_error(scorer, files):
    records = scorer.score([files[0], np.zeros((5, 5, 3), np.uint8)], ["a cat", "a cat"])
    assert records[0]["error"] is None and "expected uint8" in records[1]["error"]


@pytest.mark.parametrize("n_prompts", [2, 4])
def test_images_and_prompts_of_different_lengths_are_refused(scorer, files, n_prompts):
    with pytest.raises(IPIQAError, match="3 images but"):
        scorer.score(files[:3], ["a cat"] * n_prompts)


def test_generators_of_different_lengths_are_refused(scorer, files):
    with pytest.raises(IPIQAError, match="differ in length"):
        scorer.score(iter(files[:3]), iter(["a cat"] * 2))


def test_an_empty_list_gives_no_records(scorer):
    assert scorer.score([], []) == []


# ---------------------------------------------------------------- the model decides whether a prompt is needed


@pytest.fixture(scope="module")
def image_only_model(tmp_path_factory):
    from ipiqa.checkpoint import save_model
    from ipiqa.config import IPIQAConfig
    from ipiqa.demo import demo_model

    cfg = IPIQAConfig(**{**TINY, "text": False})
    return save_model(tmp_path_factory.mktemp("imgonly") / "m.safetensors", demo_model(cfg, seed=1).state_dict(), cfg)


def test_an_image_only_model_scores_a_manifest_without_a_prompt_column(image_only_model, files, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("image\n" + "".join(f"{f}\n" for f in files[:3]))
    with Scorer(image_only_model, device="cpu") as scorer:
        summary = scorer.score_files(manifest, tmp_path / "o.csv")
    rows = read_csv(tmp_path / "o.csv")
    assert summary.rows == 3 and summary.errors == 0 and all(r["error"] == "" for r in rows)


def test_a_text_model_refuses_a_manifest_without_a_prompt_column(scorer, files, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"image\n{files[0]}\n")
    with pytest.raises(IPIQAError, match="no prompts; this model scores an image against its prompt"):
        scorer.score_files(manifest, tmp_path / "o.csv")
