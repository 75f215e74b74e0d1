"""``ipiqa select``: best of N per prompt, thresholds, and a manifest that scoring and training read."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from ipiqa.runtime.io import RowSource
from ipiqa.runtime.results.commands import report_cmd, select_cmd
from ipiqa.runtime.results.read import ScoreRow
from ipiqa.runtime.results.sets import open_scores
from ipiqa.runtime.results.select import Selection, chosen_rows, parse_bound
from test_report import SCENARIO, write_scenario


def run_select(scores: Path, out: Path, *args: str):
    result = CliRunner().invoke(select_cmd, [str(scores), "-o", str(out), *args])
    assert result.exit_code == 0, result.output
    with open(out, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh)), result.output


def names(rows) -> list[str]:
    return [Path(r["image"]).name for r in rows]


def test_top_1_per_prompt_keeps_each_prompts_best_in_file_order(tmp_path):
    rows, said = run_select(write_scenario(tmp_path), tmp_path / "keep.csv", "--top-k", "1", "--per", "prompt")
    assert names(rows) == ["fox1.png", "tree0.png", "car2.png"]  # file order; error rows never chosen
    assert list(rows[0]) == ["image", "prompt", "quality", "alignment", "error"]
    assert float(rows[0]["quality"]) == 0.9 and rows[0]["prompt"] == "a red fox in snow" and rows[0]["error"] == ""
    assert "3 of 10 rows" in said


def test_top_k_per_all_and_ranking_by_alignment(tmp_path):
    scores = write_scenario(tmp_path)
    rows, _ = run_select(scores, tmp_path / "a.csv", "--top-k", "3", "--per", "all")
    assert names(rows) == ["fox1.png", "fox3.png", "car2.png"]
    rows, _ = run_select(scores, tmp_path / "b.csv", "--top-k", "2", "--per", "all", "--by", "alignment")
    assert names(rows) == ["tree0.png", "car2.png"]


def test_thresholds_stream_and_combine(tmp_path):
    scores = write_scenario(tmp_path)
    rows, _ = run_select(scores, tmp_path / "a.csv", "--min", "quality=0.6")
    assert names(rows) == ["fox1.png", "tree0.png", "fox3.png", "car2.png"]  # >= : 0.6 itself is kept
    rows, _ = run_select(scores, tmp_path / "b.csv", "--min", "quality=0.6", "--max", "alignment=0.8")
    assert names(rows) == ["fox1.png", "fox3.png", "car2.png"]
    rows, _ = run_select(scores, tmp_path / "c.csv", "--min", "quality=0.45", "--top-k", "1")  # filter, then best of N
    assert names(rows) == ["fox1.png", "tree0.png", "car2.png"]


def test_thresholds_do_not_hold_the_file(tmp_path):
    """Without --top-k a row is written as it is read: the first chosen row comes before the rest is read."""
    scores = open_scores(write_scenario(tmp_path))

    class Endless:
        path, outputs = scores.path, scores.outputs

        def __iter__(self):
            yield ScoreRow(0, "a.png", "p", (0.9, 0.1), None)
            raise AssertionError("read past the first row before yielding it")

    first = next(chosen_rows(Endless(), Selection((parse_bound("quality=0.5"),))))
    assert first.image == "a.png"


def test_ties_keep_the_earlier_row(tmp_path):
    rows = [("a.png", "p", 0.5, 0.1), ("b.png", "p", 0.5, 0.2), ("c.png", "p", 0.4, 0.3)]
    kept, _ = run_select(write_scenario(tmp_path, rows=rows), tmp_path / "k.csv", "--top-k", "1")
    assert names(kept) == ["a.png"]


def test_the_manifest_resolves_to_the_same_images_from_its_own_folder(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    write_scenario(folder)
    from ipiqa.runtime.io import Result, ResultWriter, Row

    rel = tmp_path / "rel.csv"  # as a run from tmp_path wrote them: paths relative to the run's folder
    with ResultWriter(rel, ("quality", "alignment")) as w:
        w.write([Result(Row(f"imgs/{n}", p), (q, a)) for n, p, q, a in SCENARIO if q is not None])
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "deep" / "er" / "keep.csv"
    rows, _ = run_select(Path("rel.csv"), out, "--top-k", "1")
    assert rows[0]["image"] == os.path.join("..", "..", "imgs", "fox1.png")
    resolved = [Path(r.image) for r in RowSource(out)]  # how ipiqa score reads it
    assert [p.name for p in resolved] == ["fox1.png", "tree0.png", "car2.png"]
    assert all(p.is_file() and p.samefile(folder / p.name) for p in resolved)
    assert [r.prompt for r in RowSource(out)] == ["a red fox in snow", "a lone tree", "a blue car"]


def test_the_train_layout_is_read_by_training(tmp_path):
    from ipiqa.training.data import check_images, load_samples

    out = tmp_path / "labels" / "keep.csv"
    run_select(write_scenario(tmp_path / "imgs"), out, "--min", "quality=0.6", "--layout", "train")
    samples, outputs = load_samples("csv", out)
    assert outputs == ("quality", "alignment") and [s.targets for s in samples][0] == (0.9, 0.7)
    assert len(check_images(samples, out.parent)) == 4  # --images <keep.csv's folder>


def test_the_manifest_is_a_scores_file_the_report_reads(tmp_path):
    scores = write_scenario(tmp_path)
    run_select(scores, tmp_path / "keep.jsonl", "--top-k", "1")
    result = CliRunner().invoke(report_cmd, [str(tmp_path / "keep.jsonl"), "-o", str(tmp_path / "r.html"), "-q"])
    assert result.exit_code == 0 and "3 rows (0 errors)" in result.output


def test_wrong_requests_are_one_clear_error(tmp_path):
    scores = write_scenario(tmp_path)
    cases = [
        (["--min", "quality>0.6"], "write OUTPUT=NUMBER"),
        (["--min", "sharpness=0.6"], "'sharpness'"),
        (["--top-k", "1", "-o", str(tmp_path / "k.parquet")], "a manifest is .csv or .jsonl"),
        (["--top-k", "1", "-o", str(scores)], "the output is the scores file it reads"),
        ([], "nothing to select by"),
    ]
    for args, message in cases:
        full = [str(scores), *args] + ([] if "-o" in args else ["-o", str(tmp_path / "k.csv")])
        result = CliRunner().invoke(select_cmd, full)
        assert result.exit_code in (1, 2) and message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert scores.read_text().startswith("image,prompt")  # never overwritten


def test_score_reads_the_manifest(tmp_path, scorer, tiny_bundle):
    """End to end on a real bundle: score a manifest, select the best of N, score the selection again."""
    pytest.importorskip("onnxruntime")
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    lines = ["image,prompt"]
    for i in range(6):
        Image.new("RGB", (64, 64), (40 * i, 255 - 40 * i, 90)).save(folder / f"{i}.png")
        lines.append(f"{i}.png,prompt {i // 3}")
    (folder / "images.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    scorer.score_files(folder / "images.csv", tmp_path / "scores.csv")
    run_select(tmp_path / "scores.csv", tmp_path / "out" / "keep.csv", "--top-k", "1")
    summary = scorer.score_files(tmp_path / "out" / "keep.csv", tmp_path / "again.csv")
    assert summary.rows == 2 and summary.errors == 0
    first = {r["image"]: float(r["quality"]) for r in csv.DictReader(open(tmp_path / "scores.csv", encoding="utf-8"))}
    again = list(csv.DictReader(open(tmp_path / "again.csv", encoding="utf-8")))
    for r in again:  # the same images, the same scores
        assert float(r["quality"]) == pytest.approx(first[str(folder / Path(r["image"]).name)], abs=1e-6)
    per_prompt = {}
    for image, q in first.items():
        p = int(Path(image).stem) // 3
        per_prompt[p] = max(per_prompt.get(p, -1e9), q)
    assert sorted(float(r["quality"]) for r in again) == pytest.approx(sorted(per_prompt.values()))


def test_progress_is_told_the_rows_read(tmp_path):
    from ipiqa.runtime.results.select import write_selection

    calls: list[int] = []
    write_selection(write_scenario(tmp_path), tmp_path / "k.csv", Selection(top_k=1), progress=calls.append)
    assert calls and calls[-1] == 10
