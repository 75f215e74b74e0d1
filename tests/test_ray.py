"""Scoring on a local Ray cluster: every row exactly once, same scores as the runtime, an actor death survived."""
from __future__ import annotations

import csv

import pytest
from click.testing import CliRunner

from conftest import make_image, same_model_tolerance
from ipiqa.cli import EXIT_ROW_ERRORS, cli
from ipiqa.runtime.io import Row
from ipiqa.runtime.scorer import Scorer

ray = pytest.importorskip("ray", reason="needs ipiqa[ray]")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rows = [Row(str(make_image(d / f"i{i:02d}.png", seed=i)), f"prompt {i % 4}") for i in range(30)]
    (d / "bad.jpg").write_bytes(b"not a jpeg")
    return rows[:10] + [Row(str(d / "bad.jpg"), "x"), Row(str(d / "i00.png"), None)] + rows[10:]


def _read(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_every_row_exactly_once_with_the_runtime_scores_despite_an_actor_death(cluster, bundle, tiny_model_file, rows,
                                                                                  tmp_path, monkeypatch):
    from ipiqa.runtime.distributed import FAIL_ONCE_ENV, score_with_ray

    marker = tmp_path / "died"
    monkeypatch.setenv(FAIL_ONCE_ENV, str(marker))  # reaches the actors through their runtime_env
    summary = score_with_ray(bundle, rows, tmp_path / "ray.csv", batch_size=4, device="cpu")
    assert marker.exists()  # an actor really was killed mid-run
    with Scorer(bundle, device="cpu") as scorer:
        scorer.score_files(rows, tmp_path / "local.csv", batch_size=4)
    got, want = _read(tmp_path / "ray.csv"), _read(tmp_path / "local.csv")
    assert [r["image"] for r in got] == [r.image for r in rows] and summary.rows == len(rows) == 32
    assert summary.errors == 2 and "not a readable image" in got[10]["error"] and "missing prompt" in got[11]["error"]
    scored = [r for r in want if not r["error"]]  # the bundle is tiny_model_file's: two evaluations of one model
    tolerance = same_model_tolerance(tiny_model_file, [r["image"] for r in scored], [r["prompt"] for r in scored])
    for a, b in zip(got, want):
        assert a["error"] == b["error"]
        if not a["error"]:
            assert abs(float(a["quality"]) - float(b["quality"])) <= tolerance


def test_parquet_output_holds_every_row(cluster, bundle, rows, tmp_path):
    import pyarrow.parquet as pq

    from ipiqa.runtime.distributed import score_with_ray

    score_with_ray(bundle, rows, tmp_path / "out.parquet", batch_size=8, device="cpu")
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column("image").to_pylist() == [r.image for r in rows]  # every row once, in input order
    assert {"image", "prompt", "quality", "alignment", "error"} <= set(table.column_names)


def test_cli_ray_flag_scores_a_manifest(cluster, bundle, rows, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,prompt\n" + "".join(f"{r.image},{r.prompt or ''}\n" for r in rows[:12]))
    res = CliRunner().invoke(cli, ["score", str(bundle), "--images", str(manifest), "-o", str(tmp_path / "o.csv"),
                                   "--ray", "--device", "cpu"])
    assert res.exit_code == EXIT_ROW_ERRORS, res.output
    assert len(_read(tmp_path / "o.csv")) == 12


def test_ray_gives_the_same_row_as_the_api_for_every_bad_input(cluster, bundle, tiny_model_file, tmp_path):
    """FIFO, /dev/zero, missing file, missing prompt, the word NaN, corrupt bytes: one rule, every entry point."""
    import os

    from ipiqa.runtime.distributed import score_with_ray

    image = make_image(tmp_path / "ok.png", seed=3)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really")
    rows = [Row(str(fifo), "a"), Row("/dev/zero", "a"), Row(str(tmp_path / "missing.png"), "a"),
            Row(str(image), None), Row(str(image), "NaN"), Row(str(tmp_path / "corrupt.jpg"), "a")]
    score_with_ray(bundle, rows, tmp_path / "ray.csv", batch_size=4, device="cpu")
    with Scorer(bundle, device="cpu") as scorer:
        api = scorer.score([r.image for r in rows], [r.prompt for r in rows])
    got = _read(tmp_path / "ray.csv")
    assert [r["error"] for r in got] == [a["error"] or "" for a in api]
    tolerance = same_model_tolerance(tiny_model_file, [rows[4].image], [rows[4].prompt])
    assert got[4]["error"] == "" and abs(float(got[4]["quality"]) - api[4]["quality"]) <= tolerance
