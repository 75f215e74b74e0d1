"""The benchmark's CI smoke mode produces a well-formed report; FLOP counts show what the pool rewrite removes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("bench"), tmp_path_factory.mktemp("work")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--images-per-prompt", "1,10", "--out", str(out),
                           "--workdir", str(work)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return json.loads((folder / "results.json").read_text()), folder


def test_smoke_report_has_every_backend_at_every_batch_and_prompt_mix(smoke):
    results, _ = smoke
    names = {r["backend"] for r in results["runs"]}
    assert {"reference-eager-fp32", "onnxruntime-cpu", "onnxruntime-cpu-int8", "onnxruntime-cpu-straightforward-pools",
            "tensorrt", "torch-fp16", "auto"} <= names
    assert {(r["images_per_prompt"], r["batch"]) for r in results["runs"]} == {(1, 1), (1, 2), (10, 1), (10, 2)}
    assert results["images_per_prompt"] == [1, 10]


def test_every_row_is_a_measurement_or_says_why_not(smoke):
    """On every CPU family: a row without a figure says why in the table's wording (the BF16 row on a CPU
    without BF16 too; its note per family is tested in test_cpu_flags)."""
    from benchmarks.__main__ import NOTE_PREFIXES

    results, _ = smoke
    for r in results["runs"]:
        if r.get("images_per_s") is None:
            assert r["note"].startswith(NOTE_PREFIXES)
        else:
            assert r["images_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 and r["iterations"] >= 2


def test_speedups_are_ratios_to_the_reference_measured_in_the_same_run(smoke):
    results, _ = smoke
    for mix, batch in ((1, 1), (1, 2), (10, 1), (10, 2)):
        rows = {r["backend"]: r for r in results["runs"] if r["batch"] == batch and r["images_per_prompt"] == mix}
        ref = rows["reference-eager-fp32"]["images_per_s"]
        assert rows["reference-eager-fp32"]["speedup"] == 1.0
        ort = rows["onnxruntime-cpu"]
        assert ort["speedup"] == pytest.approx(ort["images_per_s"] / ref)


def test_end_to_end_reports_prompt_cache_counts_at_each_mix(smoke):
    results, _ = smoke
    on = {e["images_per_prompt"]: e for e in results["end_to_end"] if e["name"] == "onnxruntime-cpu, prompt cache on"}
    assert on[10]["images"] == 4 and on[10]["cache_misses"] == 1 and on[10]["cache_hits"] == 3  # 4 images, 1 prompt
    assert on[1]["images"] == 4 and on[1]["cache_misses"] == 4 and on[1]["cache_hits"] == 0  # every prompt new


def test_at_one_image_per_prompt_the_engine_rows_never_hit_the_prompt_cache(smoke):
    """Prompts are unique per mix and batch: a backend's cache, alive across the run, finds nothing it saw before."""
    results, _ = smoke
    for r in results["runs"]:
        if r.get("prompt_cache_misses") is not None:
            if r["images_per_prompt"] == 1:
                assert r["prompt_cache_hits"] == 0 and r["prompt_cache_misses"] == r["batch"] * (r["iterations"] + 1)
            else:
                assert r["prompt_cache_hits"] > 0


def test_the_auto_row_is_named_with_its_pick_and_checked_per_mix(smoke):
    results, folder = smoke
    picked = {r["picked"] for r in results["runs"] if r["backend"] == "auto"}
    assert len(picked) == 1 and picked <= {"onnxruntime-cpu", "onnxruntime-cpu-int8", "openvino-cpu-bf16",
                                           "openvino-cpu-int8"}
    assert [c["images_per_prompt"] for c in results["auto_check"]] == [1, 10]
    assert all(c["picked"] in picked and c["passed"] in (True, False) for c in results["auto_check"])
    text = (folder / "results.md").read_text()
    assert f"| auto → {picked.pop()} | 1 |" in text and "cpu_auto_choice" in results["auto_reason"]
    assert "## `auto` against the fastest gated row" in text


def test_markdown_and_machine_info_are_written(smoke):
    results, folder = smoke
    text = (folder / "results.md").read_text()
    assert "| backend | batch |" in text and "reference-eager-fp32" in text
    assert results["machine"]["cores"] >= 1 and "onnxruntime" in results["machine"]["versions"]


def test_single_query_pools_remove_the_token_projections(smoke):
    """Fusion loses its 2 x 257 token projections; the image encoder loses the visual pool's 3 x 257."""
    flops = smoke[0]["flops"]
    assert flops["fusion"]["single_query"] < flops["fusion"]["straightforward"] / 5
    assert flops["image_encoder"]["single_query"] < flops["image_encoder"]["straightforward"]
    assert flops["text_encoder"]["single_query"] == flops["text_encoder"]["straightforward"]


def test_smoke_report_has_host_rates_cores_needed_and_job_growth(smoke):
    results, folder = smoke
    host = results["host"]
    assert {r["path"] for r in host["report"]["per_core"]} >= {"uint8 exact", "float, before #13"}
    assert {r["pool"] for r in host["report"]["scaling"]} == {"thread", "process"}
    assert all(c["cores_needed"] is None or c["cores_needed"] > 0 for c in host["cores_needed"])
    rows = [j["rows"] for j in results["jobs"]["rows"]]
    assert rows == [500, 2000] and all(j["peak_rss_mib"] > 0 and j["resume_seconds"] > 0 for j in results["jobs"]["rows"])
    md = (folder / "results.md").read_text()
    assert "Host cores needed" in md and "Jobs of any size" in md and "Fast decode path" in md


def test_the_overhead_rows_pair_the_image_graph_alone_with_score_arrays_on_one_backend(tiny_bundle):
    from benchmarks.overhead import markdown, measure

    (row,) = measure(tiny_bundle, (("onnxruntime", "fp32"),), seconds=0.2, warmup=1)
    assert row.backend == "onnxruntime-cpu" and row.iterations >= 2
    assert row.image_graph_per_s > 0 and row.cached_prompt_per_s > 0 and row.new_prompt_per_s > 0
    assert row.cached_ratio == row.cached_prompt_per_s / row.image_graph_per_s
    assert "| onnxruntime-cpu | 1 |" in markdown([row])


def test_a_run_without_engine_rows_writes_no_empty_plot(tmp_path):
    from benchmarks.report import write_report

    results = {"machine": {"cpu": "c", "cores": 2, "gpu": {}}, "slug": "s", "resolution": 224, "images_per_prompt": 10,
               "timestamp": "t", "runs": []}
    written = write_report(results, tmp_path)
    assert [p.name for p in written] == ["results.json", "results.md"] and not (tmp_path / "throughput.png").exists()
