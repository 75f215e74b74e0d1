"""Scores sets: ``ipiqa report`` and ``ipiqa select`` take a folder, list or pattern of score files as one file."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
from click.testing import CliRunner

from ipiqa.errors import IPIQAError
from ipiqa.runtime.io import Result, ResultWriter, Row
from ipiqa.runtime.results.collect import collect
from ipiqa.runtime.results.commands import report_cmd, select_cmd
from ipiqa.runtime.results.sets import open_scores, score_files
from test_report import OUTPUTS, SCENARIO, write_scenario


def split_scenario(folder: Path, fmts=("csv", "jsonl", "parquet"), cuts=(4, 7)) -> Path:
    """SCENARIO's rows in three score files 00000/00001/00002 (one format each), as --output-dir writes them."""
    whole = write_scenario(folder / "whole")  # the images, and the one-file reference
    rows = list(open_scores(whole))
    folder = folder / "scores"
    folder.mkdir()
    bounds = [0, *cuts, len(rows)]
    for n, fmt in enumerate(fmts):
        part = rows[bounds[n]:bounds[n + 1]]
        with ResultWriter(folder / f"{n:05d}.{fmt}", OUTPUTS) as writer:
            writer.write([Result(Row(r.image, r.prompt), r.scores, r.error) for r in part])
    return folder


def summary(data):
    return (data.rows, data.scored, data.errors, data.causes, [(s.name, s.mean, s.min, s.max) for s in data.summaries],
            [r.image for r in data.worst], [r.image for r in data.best], [r.index for r in data.sample],
            [(g.stats.prompt, [r.image for r in g.best]) for g in data.groups])


def test_a_folder_is_its_complete_score_files_in_name_order(tmp_path):
    folder = split_scenario(tmp_path)
    (folder / ".00003.csv.partial").write_text("image,prompt,quality,alignment,error\n")  # a shard being scored
    (folder / ".00003.csv.lock").write_text("pid 1\n")
    (folder / "00000.csv.run.json").write_text("{}")  # a provenance sidecar is no scores file
    (folder / ".keep.4242.tmp.csv").write_text("image,prompt,quality,alignment,error\n")  # a hidden file being written
    files, partials = score_files(folder)
    assert [p.name for p in files] == ["00000.csv", "00001.jsonl", "00002.parquet"] and partials == 1
    assert "3 files: csv+jsonl+parquet; 1 partial file(s) left out" in open_scores(folder).describe()


def test_a_set_reads_as_the_one_file_holding_its_rows(tmp_path):
    """Mixed formats, rows numbered on across files, prompts spanning files: the report's data is the same."""
    folder = split_scenario(tmp_path)
    assert summary(collect(open_scores(folder))) == summary(collect(open_scores(tmp_path / "whole" / "scores.csv")))
    assert [r.index for r in open_scores(folder)] == list(range(len(SCENARIO)))


def test_a_pattern_a_brace_list_and_a_list_file_name_the_same_set(tmp_path):
    folder = split_scenario(tmp_path, fmts=("csv", "csv", "csv"))
    listing = tmp_path / "scores.txt"
    listing.write_text("# the run's files\nscores/00000.csv\n\nscores/0000[12].csv\n")
    want = [folder / f"{n:05d}.csv" for n in range(3)]
    for spec in (f"{folder}/*.csv", f"{folder}/{{00000..00002}}.csv", listing, folder):
        assert [Path(p) for p in score_files(spec)[0]] == want, spec


def test_a_missing_listed_file_is_refused_naming_it(tmp_path):
    folder = split_scenario(tmp_path)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{folder}/00000.csv\n{folder}/00009.csv\n")
    with pytest.raises(IPIQAError, match=r"00009.csv: no such scores file \(1 of 2"):
        open_scores(listing)


def test_disagreeing_score_columns_are_refused_naming_both_files(tmp_path):
    folder = split_scenario(tmp_path)
    with ResultWriter(folder / "00003.csv", ("quality",)) as writer:
        writer.write([Result(Row("x.png", "p"), (0.5,))])
    with pytest.raises(IPIQAError) as exc:
        open_scores(folder)
    assert "00003.csv: its score columns ['quality'] are not" in str(exc.value)
    assert "00000.csv's ['quality', 'alignment']" in str(exc.value)


def test_a_folder_with_only_partial_files_says_the_run_is_not_finished(tmp_path):
    (tmp_path / ".00000.csv.partial").write_text("image,prompt,quality,error\n")
    with pytest.raises(IPIQAError, match="holds no score files.*only 1 partial one"):
        open_scores(tmp_path)


def test_a_set_streams_file_after_file(tmp_path):
    """The first row comes before the next file is opened: a later file is read only when reached."""
    folder = split_scenario(tmp_path, fmts=("csv", "csv", "csv"))
    rows = iter(open_scores(folder))
    first = next(rows)
    (folder / "00002.csv").write_text("image,prompt,quality,alignment,error\nz.png,p,not a number,,\n")
    assert first.index == 0
    with pytest.raises(IPIQAError, match="00002.csv: row 1 .* unreadable scores"):
        list(rows)


def test_select_over_a_folder_keeps_what_it_keeps_from_the_one_file(tmp_path):
    folder = split_scenario(tmp_path)
    for args in (["--top-k", "1", "--per", "prompt"], ["--min", "quality=0.6"], ["--top-k", "2", "--per", "all"]):
        kept = {}
        for name, spec in (("one", tmp_path / "whole" / "scores.csv"), ("set", folder)):
            out = tmp_path / f"{name}.csv"
            res = CliRunner().invoke(select_cmd, [str(spec), "-o", str(out), *args])
            assert res.exit_code == 0, res.output
            with open(out, newline="") as fh:
                kept[name] = [(Path(r["image"]).name, r["quality"]) for r in csv.DictReader(fh)]
        assert kept["set"] == kept["one"] and kept["one"], args
    assert "of 3 score files" in res.output


def test_an_output_inside_the_scores_folder_is_refused(tmp_path):
    """It would be one more file of the set the next time the folder is read."""
    folder = split_scenario(tmp_path)
    res = CliRunner().invoke(select_cmd, [str(folder), "--top-k", "1", "-o", str(folder / "keep.csv")])
    assert res.exit_code == 1 and "inside the scores folder" in res.output and "Traceback" not in res.output


def test_report_of_a_folder_names_the_set(tmp_path):
    folder = split_scenario(tmp_path)
    out = tmp_path / "r.html"
    res = CliRunner().invoke(report_cmd, [str(folder), "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    page = out.read_text()
    assert "scores set" in page and "3 files: csv+jsonl+parquet" in page and f"{len(SCENARIO)} rows" in res.output


def test_a_name_that_is_nothing_is_one_line(tmp_path):
    res = CliRunner().invoke(report_cmd, [str(tmp_path / "nope.csv")])
    assert res.exit_code == 1 and "no such scores file or folder" in res.output and "Traceback" not in res.output


def test_a_file_of_the_set_cut_by_a_killed_run_is_named_and_its_rows_before_the_cut_reported(tmp_path):
    folder = split_scenario(tmp_path, fmts=("csv", "csv", "csv"))
    with open(folder / "00001.csv", "ab") as fh:
        fh.write(b"/x/cut.png,a half writ")  # the record a kill cut in half
    out = tmp_path / "r.html"
    res = CliRunner().invoke(report_cmd, [str(folder), "-o", str(out), "-q"])
    assert res.exit_code == 0 and f"{len(SCENARIO)} rows" in res.output
    assert f"{folder / '00001.csv'} ends in a partial record" in out.read_text()
