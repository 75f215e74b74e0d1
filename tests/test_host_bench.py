"""benchmarks.host runs end to end at toy sizes and returns well-formed results (no timing asserts)."""
from __future__ import annotations

import math

import pytest

from benchmarks import host


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return host.run(resolution=32, sources=(64,), images=2, repeats=1, scaling_source=64, workers=(1, 2),
                    folder=tmp_path_factory.mktemp("host"))


def test_every_path_is_measured_on_every_source(report):
    assert {(r.source, r.path) for r in report.per_core} == {(64, label) for label in host.PATHS}
    assert all(r.images_per_s > 0 and math.isclose(r.ms_per_image, 1000 / r.images_per_s) for r in report.per_core)


def test_both_pool_kinds_are_measured_and_one_is_named_faster(report):
    assert {(r.pool, r.workers) for r in report.scaling} == {("thread", 1), ("thread", 2), ("process", 1), ("process", 2)}
    assert all(r.speedup == 1.0 for r in report.scaling if r.workers == 1)
    assert report.faster_pool in ("thread", "process")


def test_fast_path_deviation_is_reported_per_source(report):
    (fast,) = report.fast
    assert fast.source == 64 and 0 <= fast.max_abs_pixel <= 255 and 0 <= fast.mean_abs_pixel <= fast.max_abs_pixel
    assert fast.speedup > 0


def test_markdown_has_a_row_per_measurement(report):
    text = host.markdown(report)
    assert "| 64x64 JPEG |" in text and "faster: **" in text and "| 64x64 |" in text
    assert text.count("| thread |") == 2 and text.count("| process |") == 2


def test_results_are_frozen(report):
    with pytest.raises(AttributeError):
        report.per_core[0].images_per_s = 0.0
