"""The torch-free runtime: same scores as the reference, cached prompts, resumable, and no bad input loses a row."""
from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, fp32_rule_tolerance, make_image
from ipiqa.checkpoint import save_model
from ipiqa.config import IPIQAConfig
from ipiqa.demo import demo_model
from ipiqa.errors import BundleError, IPIQAError
from ipiqa.runtime.io import Row, read_rows
from ipiqa.export.bundle_export import ExportOptions, export_bundle
from ipiqa.runtime.scorer import Scorer


@pytest.fixture(scope="module")
def scorer(tiny_bundle):
    with Scorer(tiny_bundle, backend="onnxruntime", device="cpu") as s:
        yield s


@pytest.fixture
def good_images(tmp_path):
    d = tmp_path / "good"
    d.mkdir()
    return [make_image(d / f"g{i}.png", size=(40 + i, 30), seed=i) for i in range(4)]


def _csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height: PIL's decompression-bomb check fires on the header alone."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))
    return path


# ---------------------------------------------------------------- parity and behaviour

def test_runtime_scores_equal_the_pypytorcherence_on_the_same_files(tiny_bundle, tiny_model_file, good_images):
    prompts = ["a cat", "a dog", "a cat", "a bird"]
    with Scorer(tiny_bundle, backend="onnxruntime", device="cpu") as rt, Scorer(tiny_model_file, backend="torch", device="cpu") as ref:
        a, b = rt.score(good_images, prompts), ref.score(good_images, prompts)
    tolerance = fp32_rule_tolerance(tiny_model_file, good_images, prompts)  # the gate's rule on these inputs
    for x, y in zip(a, b):
        assert x["error"] is None and abs(x["quality"] - y["quality"]) <= tolerance
        assert abs(x["alignment"] - y["alignment"]) <= tolerance


def test_prompt_cache_encodes_each_distinct_prompt_once(tiny_bundle, good_images):
    with Scorer(tiny_bundle, backend="onnxruntime", device="cpu") as s:
        s.score(good_images, ["a cat", "a cat", "a dog", "a cat"])
        s.score(good_images[:2], ["a dog", "a fish"])
        assert (s.cache.misses, s.cache.hits) == (3, 3)


def test_prompt_cache_is_bounded_and_evicts_least_recently_used():
    from ipiqa.runtime.cache import PromptCache

    cache, calls = PromptCache(max_entries=2), []
    encode = lambda t: (calls.append(len(t)), t[:, :4].astype(np.float32))[1]  # noqa: E731
    ids = lambda *v: np.array([[i, 0, 0, 0] for i in v], dtype=np.int64)  # noqa: E731
    cache.lookup(ids(1, 2), encode)
    cache.lookup(ids(1), encode)      # 1 becomes most recent
    cache.lookup(ids(3), encode)      # evicts 2
    cache.lookup(ids(1, 2), encode)   # 1 hit, 2 re-encoded
    assert len(cache) == 2 and calls == [2, 1, 1] and (cache.hits, cache.misses) == (2, 4)


def test_scores_do_not_depend_on_batch_composition(scorer, good_images):
    """Bit for bit: every engine call runs at one batch size (issue 28, tests/test_reproducible.py)."""
    together = scorer.score(good_images, ["p"] * 4)
    alone = [scorer.score([img], ["p"])[0] for img in good_images]
    assert together == alone


def test_score_api_returns_one_record_per_image_with_errors(scorer, good_images, tmp_path):
    records = scorer.score([good_images[0], tmp_path / "nope.jpg", Image.new("RGB", (5, 5))], ["a", "b", None])
    assert records[0]["error"] is None and isinstance(records[0]["quality"], float)
    assert "file not found" in records[1]["error"] and records[1]["quality"] is None
    assert records[2]["error"].startswith("missing prompt")


def test_auto_backend_on_cpu_is_onnxruntime(tiny_bundle):
    with Scorer(tiny_bundle, device="cpu") as s:
        assert s.backend.name == "onnxruntime-cpu"


def test_torch_backend_for_a_bundle_is_refused_with_the_fix(tiny_bundle):
    with pytest.raises(IPIQAError, match="model file"):
        Scorer(tiny_bundle, backend="torch")


def test_bundle_with_a_changed_graph_is_refused(tiny_bundle, tmp_path):
    copy = shutil.copytree(tiny_bundle, tmp_path / "b")
    other = tmp_path / "other"
    cfg = IPIQAConfig(**TINY)
    m = demo_model(cfg, seed=99)
    export_bundle(m, [save_model(tmp_path / "o.safetensors", m.state_dict(), cfg)], other, ExportOptions(onnx_only=True),
                  progress=lambda s: None)
    shutil.copyfile(other / "fusion.onnx.data", copy / "fusion.onnx.data")  # another model's weights
    with pytest.raises(BundleError, match="fusion.onnx.data: SHA-256"):
        Scorer(copy)


# ---------------------------------------------------------------- files, resume, bad input

def test_resume_after_a_kill_writes_every_row_exactly_once(scorer, good_images, tmp_path):
    rows = [Row(str(p), f"prompt {i % 2}") for i, p in enumerate(good_images * 3)]
    full = tmp_path / "full.csv"
    scorer.score_files(rows, full, batch_size=2)
    content = full.read_bytes()
    expected = _csv(full)
    for cut in (len(content) // 3, len(content) // 2 + 7, len(content) - 5):  # kills mid-record
        part = tmp_path / f"part{cut}.csv"
        part.write_bytes(content[:cut])
        summary = scorer.score_files(rows, part, batch_size=2, resume=True)
        got = _csv(part)
        assert [r["image"] for r in got] == [r.image for r in rows]  # each row once, in order
        assert summary.skipped + summary.rows == len(rows)
        assert got == expected  # batches start at another row after a resume: the same bits all the same


def test_resume_jsonl_continues_after_the_last_complete_line(scorer, good_images, tmp_path):
    rows = [Row(str(p), "x") for p in good_images]
    full = tmp_path / "full.jsonl"
    scorer.score_files(rows, full, batch_size=1)
    lines = full.read_text().splitlines(keepends=True)
    part = tmp_path / "part.jsonl"
    part.write_text("".join(lines[:2]) + lines[2][:10])
    scorer.score_files(rows, part, batch_size=1, resume=True)
    assert part.read_text() == full.read_text()  # batch 1: identical computation, identical bytes


def test_resume_refuses_an_output_of_another_input(scorer, good_images, tmp_path):
    out = tmp_path / "o.csv"
    scorer.score_files([Row(str(good_images[0]), "x")], out)
    with pytest.raises(IPIQAError, match="same input in the same order"):
        scorer.score_files([Row(str(good_images[1]), "x")], out, resume=True)


def _bad_file(kind: str, d: Path) -> Path:
    src = make_image(d / "src.png", size=(64, 64), seed=9)
    if kind == "missing file":
        return d / "missing.jpg"
    if kind == "zero-byte file":
        (d / "zero.jpg").write_bytes(b"")
        return d / "zero.jpg"
    if kind == "truncated jpeg":
        Image.open(src).save(d / "t.jpg", quality=95)
        (d / "t.jpg").write_bytes((d / "t.jpg").read_bytes()[:400])
        return d / "t.jpg"
    if kind == "directory in place of a file":
        (d / "folder.jpg").mkdir()
        return d / "folder.jpg"
    if kind == "decompression bomb 20000x20000":
        return _png_header_only(d / "bomb.png", 20000, 20000)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind,message", [
    ("missing file", "file not found"), ("zero-byte file", "empty file"), ("truncated jpeg", "corrupt image"),
    ("directory in place of a file", "is a directory"), ("decompression bomb 20000x20000", "decompression bomb"),
])
def test_bad_file_becomes_an_error_row_and_others_are_scored(scorer, good_images, tmp_path, kind, message):
    bad = _bad_file(kind, tmp_path)
    rows = [Row(str(good_images[0]), "x"), Row(str(bad), "x"), Row(str(good_images[1]), "x")]
    out = tmp_path / "o.csv"
    summary = scorer.score_files(rows, out, batch_size=3)
    got = _csv(out)
    assert [r["image"] for r in got] == [r.image for r in rows] and summary.errors == 1
    assert message in got[1]["error"] and got[1]["quality"] == ""
    assert got[0]["quality"] and got[2]["quality"] and not got[0]["error"] and not got[2]["error"]


@pytest.mark.parametrize("kind", ["png with .jpg extension", "cmyk jpeg", "16-bit png", "palette png with transparency",
                                  "1x1 image", "animated gif"])
def test_unusual_but_valid_images_are_scored(scorer, tmp_path, kind):
    p = tmp_path / "img"
    rng = np.random.default_rng(0)
    if kind == "png with .jpg extension":
        p = make_image(tmp_path / "really_png.jpg", seed=1)
        Image.open(p).save(p, format="PNG")
    elif kind == "cmyk jpeg":
        p = tmp_path / "c.jpg"
        Image.fromarray(rng.integers(0, 255, (32, 32, 4), dtype=np.uint8), "CMYK").save(p)
    elif kind == "16-bit png":
        p = tmp_path / "w.png"
        Image.fromarray((rng.integers(0, 65535, (32, 32))).astype(np.uint16)).save(p)
        assert Image.open(p).mode.startswith("I")
    elif kind == "palette png with transparency":
        p = tmp_path / "p.png"
        img = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).convert("P")
        img.info["transparency"] = 0
        img.save(p, transparency=0)
    elif kind == "1x1 image":
        p = tmp_path / "one.png"
        Image.new("RGB", (1, 1), (200, 100, 50)).save(p)
    elif kind == "animated gif":
        p = tmp_path / "a.gif"
        frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
        frames[0].save(p, save_all=True, append_images=frames[1:])
    (record,) = scorer.score([p], ["a prompt"])
    assert record["error"] is None and np.isfinite(record["quality"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_an_error_row(scorer, good_images, tmp_path):
    p = make_image(tmp_path / "locked.png")
    p.chmod(0)
    (record,) = scorer.score([p], ["x"])
    assert "permission denied" in record["error"]


@pytest.mark.parametrize("cell", ["", "   ", '"  \t "'])
def test_empty_or_blank_prompt_in_manifest_is_an_error_row(scorer, good_images, tmp_path, cell):
    m = tmp_path / "m.csv"
    m.write_text(f"image,prompt\n{good_images[0]},a cat\n{good_images[1]},{cell}\n", encoding="utf-8")
    out = tmp_path / "o.csv"
    scorer.score_files(m, out)
    got = _csv(out)
    assert not got[0]["error"] and "missing prompt" in got[1]["error"]


def test_jsonl_manifest_with_null_prompt(scorer, good_images, tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"image": str(good_images[0]), "prompt": None}) + "\n" +
                 json.dumps({"image": good_images[1].name, "prompt": "ok"}) + "\n")
    (good_images[1].parent / good_images[1].name).replace(tmp_path / good_images[1].name)
    out = tmp_path / "o.jsonl"
    scorer.score_files(m, out)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert "missing prompt" in recs[0]["error"] and recs[1]["error"] is None  # relative path resolved


def test_tsv_manifest_with_bom_is_read(good_images, tmp_path):
    m = tmp_path / "m.tsv"
    m.write_text("\ufeffimage\tprompt\n" + f"{good_images[0]}\ta cat\n", encoding="utf-8")
    assert read_rows(m) == [Row(str(good_images[0]), "a cat")]


def test_fail_fast_stops_after_the_first_error(scorer, good_images, tmp_path):
    rows = [Row(str(tmp_path / "missing.png"), "x")] + [Row(str(p), "x") for p in good_images]
    summary = scorer.score_files(rows, tmp_path / "o.csv", batch_size=1, fail_fast=True)
    assert summary.stopped and summary.rows == 1


# ---------------------------------------------------------------- the torch-free boundary

TORCH_FREE = r"""
import sys
from click.testing import CliRunner
import ipiqa, ipiqa.runtime, ipiqa.runtime.scorer
from ipiqa.cli import cli
for args in (["--help"], ["score", "--help"], ["score", sys.argv[1], "--images", sys.argv[2], "--prompt", "a cat",
                                              "-o", sys.argv[3], "--device", "cpu", "-q"]):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, (args, result.output)
assert "torch" not in sys.modules, "torch was imported"
assert "ray" not in sys.modules, "ray was imported without --ray"
print("torch-free")
"""


def test_runtime_import_help_and_scoring_never_import_torch(tiny_bundle, good_images, tmp_path):
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE, str(tiny_bundle), str(good_images[0].parent),
                           str(tmp_path / "o.csv")], capture_output=True, text=True)
    assert proc.returncode == 0 and "torch-free" in proc.stdout, proc.stderr[-2000:]
    assert len(_csv(tmp_path / "o.csv")) == len(good_images)


def test_ipiqa_score_console_script_scores_a_bundle(tiny_bundle, good_images, tmp_path):
    exe = Path(sys.executable).parent / "ipiqa-score"
    if not exe.exists():
        pytest.skip("ipiqa-score is not installed in this environment")
    proc = subprocess.run([str(exe), str(tiny_bundle), "--image", str(good_images[0]), "--prompt", "x", "--device", "cpu",
                           "--format", "jsonl", "-q"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[0])["error"] is None


@pytest.mark.slow
def test_compiled_torch_backend_matches_eager(tiny_model_file, good_images):
    with Scorer(tiny_model_file, backend="torch", device="cpu") as eager, \
            Scorer(tiny_model_file, backend="torch", device="cpu", compile=True) as compiled:
        assert compiled.backend.name == "torch-cpu-compiled"
        a, b = eager.score(good_images, ["x"] * 4), compiled.score(good_images, ["x"] * 4)
    tolerance = fp32_rule_tolerance(tiny_model_file, good_images, ["x"] * 4)  # a backend: the gate's rule
    assert all(abs(x["quality"] - y["quality"]) <= tolerance for x, y in zip(a, b))
