"""``ipiqa report`` shows what made the scores (the run records ``ipiqa score`` writes), not "not recorded"."""
from __future__ import annotations

from dataclasses import replace

import pytest

from ipiqa.errors import ConfigError
from ipiqa.runtime.io.provenance import Provenance, write_provenance
from ipiqa.runtime.results.runinfo import run_lines
from ipiqa.runtime.results.sets import open_scores
from test_report import page_of, write_scenario
from test_results_sets import split_scenario

RUN = Provenance(bundle_sha256="ab" * 32, backend="onnxruntime-cpu", precision="fp32", engine_batch=8,
                 ipiqa_version="0.9.1", machine="Intel Xeon (Ice Lake)")


def test_the_report_shows_the_recorded_run(tmp_path):
    scores = write_scenario(tmp_path)
    write_provenance(scores, RUN, 0)
    html, _ = page_of(scores)
    for text in ("<td>backend</td><td>onnxruntime-cpu</td>", "<td>precision</td><td>fp32</td>",
                 "<td>engine batch</td><td>8</td>", "ipiqa 0.9.1 on Intel Xeon (Ice Lake)", "abab"):
        assert text in html, text
    assert "not recorded" not in html


def test_a_set_of_one_run_shows_it_once_and_counts_files_without_a_record(tmp_path):
    folder = split_scenario(tmp_path, fmts=("csv", "jsonl", "csv"))
    for n in (0, 1):
        write_provenance(folder / f"{n:05d}.{('csv', 'jsonl')[n]}", RUN, 0)
    lines = dict(run_lines(open_scores(folder)))
    assert lines["backend"] == "onnxruntime-cpu" and lines["not recorded"] == "1 of 3 files have no run record"


def test_files_of_different_runs_are_each_shown_and_the_difference_named(tmp_path):
    folder = split_scenario(tmp_path, fmts=("csv", "csv", "csv"))
    write_provenance(folder / "00000.csv", RUN, 0)
    write_provenance(folder / "00001.csv", RUN, 0)
    write_provenance(folder / "00002.csv", replace(RUN, backend="openvino-cpu", machine="AMD EPYC"), 0)
    lines = run_lines(open_scores(folder))
    labels = [k for k, _ in lines]
    assert labels[:2] == ["run 1 (2 files)", "run 2 (1 file)"] and "openvino-cpu" in lines[1][1]
    assert dict(lines)["note"].startswith("the files were scored with different backend")


def test_a_bundle_other_than_the_recorded_one_is_refused(tmp_path, tiny_bundle):
    scores = write_scenario(tmp_path)
    write_provenance(scores, replace(RUN, bundle_sha256="cd" * 32), 0)
    with pytest.raises(ConfigError, match="not the one the scores' run records name"):
        run_lines(open_scores(scores), tiny_bundle)
