"""Decoding on the backend's device (torch backend; nvJPEG on CUDA) gives the host path's rows.

On a CPU device the device path decodes with Pillow, so its rows must equal the host path's exactly: this
checks the wiring (batching, error rows, order) here; the GPU test measures the IDCT difference where CUDA is.
"""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from PIL import Image

from conftest import make_image
from ipiqa.errors import IPIQAError
from ipiqa.runtime.io import Row
from ipiqa.runtime.scorer import Scorer

torch = pytest.importorskip("torch")


def _csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def rows(tmp_path):
    good = [make_image(tmp_path / f"g{i}.png", size=(50 + 9 * i, 40), seed=i) for i in range(3)]
    jpeg = tmp_path / "j.jpg"
    Image.open(good[0]).convert("RGB").resize((96, 80)).save(jpeg, quality=90)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff junk")
    return [Row(str(good[0]), "a"), Row(str(fifo), "a"), Row(str(jpeg), "b"), Row(str(tmp_path / "missing.png"), "a"),
            Row(str(good[1]), None), Row(str(tmp_path / "bad.jpg"), "a"), Row(str(good[2]), "c")]


def test_device_decode_gives_the_host_rows_exactly_on_a_cpu_device(tiny_model_file, rows, tmp_path):
    with Scorer(tiny_model_file, backend="torch", device="cpu") as scorer:
        scorer.score_files(rows, tmp_path / "host.csv", batch_size=4)
        scorer.score_files(rows, tmp_path / "device.csv", batch_size=4, decode="device")
    host, device = _csv(tmp_path / "host.csv"), _csv(tmp_path / "device.csv")
    assert [r["error"] for r in device] == [r["error"] for r in host]
    assert sum(bool(r["error"]) for r in host) == 4 and "named pipe" in host[1]["error"]
    assert [r["quality"] for r in device] == [r["quality"] for r in host]  # same pixels, same graph: same bits


def test_device_decode_is_refused_for_a_backend_that_cannot(tiny_bundle, rows, tmp_path):
    with Scorer(tiny_bundle, device="cpu") as scorer:
        with pytest.raises(IPIQAError, match="decode='device' needs the torch backend"):
            scorer.score_files(rows, tmp_path / "o.csv", decode="device")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_gpu_decode_scores_stay_within_the_fp32_gate_of_the_host_path(tiny_model_file, tmp_path):
    paths = []
    for i in range(8):
        p = tmp_path / f"{i}.jpg"
        arr = np.random.default_rng(i).integers(0, 256, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(arr).resize((700, 500), Image.BICUBIC).save(p, quality=90)
        paths.append(Row(str(p), "a photo"))
    with Scorer(tiny_model_file, backend="torch", device="cuda") as scorer:
        scorer.score_files(paths, tmp_path / "host.csv")
        scorer.score_files(paths, tmp_path / "gpu.csv", decode="device")
    host, gpu = _csv(tmp_path / "host.csv"), _csv(tmp_path / "gpu.csv")
    diff = max(abs(float(a["quality"]) - float(b["quality"])) for a, b in zip(host, gpu))
    print(f"nvJPEG vs libjpeg: max |d quality| {diff:.2e}")
    assert diff <= 1e-2


def test_fast_decode_is_opt_in_and_close_to_the_exact_path(tiny_bundle, tmp_path):
    big = tmp_path / "big.jpg"
    arr = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(arr).resize((512, 512), Image.BICUBIC).save(big, quality=90)  # >= 2x the 64 px resolution
    rows = [Row(str(big), "a photo")]
    with Scorer(tiny_bundle, device="cpu") as scorer:
        scorer.score_files(rows, tmp_path / "exact.csv")
        scorer.score_files(rows, tmp_path / "fast.csv", fast_decode=True)
    exact, fast = _csv(tmp_path / "exact.csv")[0], _csv(tmp_path / "fast.csv")[0]
    assert exact["quality"] != fast["quality"]  # really another path: the default is the exact one
    assert abs(float(exact["quality"]) - float(fast["quality"])) < 1e-2


def test_a_path_the_os_refuses_is_an_error_row_on_the_device_path_too(tiny_model_file, rows, tmp_path):
    odd = [Row(str(tmp_path / "nul\x00.jpg"), "a"), rows[0]]
    with Scorer(tiny_model_file, backend="torch", device="cpu") as scorer:
        summary = scorer.score_files(odd, tmp_path / "o.csv", decode="device")
    got = _csv(tmp_path / "o.csv")
    assert summary.rows == 2 and "ValueError" in got[0]["error"] and not got[1]["error"]
