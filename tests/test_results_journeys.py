"""Journeys through the results commands, chained as a user chains them: a run over shards into --output-dir,
then ``ipiqa report`` and ``ipiqa select`` over that folder, then the selection as new shards scored again."""
from __future__ import annotations

import json
import tarfile

import pytest
from click.testing import CliRunner

from conftest import read_csv
from ipiqa.cli import cli
from test_shards import jpeg, write_shard


def run(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def scored(tiny_model_file, tmp_path_factory):
    """Three shards of 5 samples (prompts repeat across shards), scored into scores/ one file per shard."""
    root = tmp_path_factory.mktemp("journey")
    shards = root / "shards"
    shards.mkdir()
    for s in range(3):
        members = []
        for i in range(5):
            key = f"{s}{i:05d}"
            members += [(f"{key}.jpg", jpeg(7 * s + i)), (f"{key}.txt", f"a scene number {i % 3}".encode()),
                        (f"{key}.json", json.dumps({"id": key}).encode())]
        write_shard(shards / f"{s:05d}.tar", members)
    run("score", tiny_model_file, "--images", f"{shards}/*.tar", "--output-dir", root / "scores", "--batch", 1, "-q")
    return root


def all_rows(scored):
    return [r for s in range(3) for r in read_csv(scored / "scores" / f"{s:05d}.csv")]


def test_report_of_the_output_dir_counts_every_shards_rows(scored, tmp_path):
    said = run("report", scored / "scores", "-o", tmp_path / "r.html", "-q")
    page = (tmp_path / "r.html").read_text()
    assert "15 rows (0 errors)" in said and "3 files: csv" in page
    assert "<td>precision</td><td>fp32</td>" in page and "not recorded" not in page  # the run records, shown


def test_select_best_per_prompt_over_the_output_dir(scored, tmp_path):
    run("select", scored / "scores", "--top-k", "1", "--per", "prompt", "-o", tmp_path / "sel.csv")
    rows = all_rows(scored)
    best = {}
    for r in rows:  # the best of each prompt over all three shards' files (ties: the earlier row)
        if r["prompt"] not in best or float(r["quality"]) > float(best[r["prompt"]]["quality"]):
            best[r["prompt"]] = r
    kept = read_csv(tmp_path / "sel.csv")
    assert sorted(r["image"].rpartition("::")[2] for r in kept) == sorted(
        r["image"].rpartition("::")[2] for r in best.values())
    assert len(kept) == 3


def test_selected_shards_score_again_to_the_kept_rows_scores(scored, tiny_model_file, tmp_path):
    said = run("select", scored / "scores", "--top-k", "2", "--per", "prompt", "--to-shards", tmp_path / "out",
               "--shard-size", "4")
    assert "wrote 2 shards" in said and "6 samples" in said
    with tarfile.open(tmp_path / "out" / "00000.tar") as tf:
        names = tf.getnames()
    assert {n.partition(".")[2] for n in names} == {"jpg", "txt", "json", "scores.json"}
    run("score", tiny_model_file, "--images", f"{tmp_path}/out/*.tar", "-o", tmp_path / "again.csv", "--batch", 1, "-q")
    again = {r["image"].rpartition("::")[2]: r for r in read_csv(tmp_path / "again.csv")}
    first = {r["image"].rpartition("::")[2]: r for r in all_rows(scored)}
    assert len(again) == 6 and all(r["error"] == "" for r in again.values())
    for key, r in again.items():
        assert r["prompt"] == first[key]["prompt"]
        assert float(r["quality"]) == pytest.approx(float(first[key]["quality"]), abs=1e-6)
