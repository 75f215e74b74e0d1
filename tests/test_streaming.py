"""Jobs of any size: rows stream through, resume reads the output once, one run per output, clear disk errors."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import read_csv
from ipiqa.runtime.io import OutputError, OutputLock, ResultWriter, Row, RowSource, resume_point
from ipiqa.runtime.rows import Result


_csv = read_csv


def test_rows_are_pulled_lazily_a_few_batches_ahead_of_the_writer(scorer, image, tmp_path):
    pulled, seen_at_first_write = [0], []

    def rows():
        for i in range(200):
            pulled[0] += 1
            yield Row(str(image), f"p{i % 3}")

    scorer.score_files(rows(), tmp_path / "o.csv", batch_size=4, workers=2,
                       on_results=lambda r: seen_at_first_write.append(pulled[0]))
    assert seen_at_first_write[0] <= 4 * 4  # batch x (depth + 2): never the whole job
    assert len(_csv(tmp_path / "o.csv")) == 200


def test_a_manifest_is_read_lazily_and_a_bad_line_is_its_own_error_row(image, tmp_path):
    m = tmp_path / "m.csv"
    m.write_bytes(b"image,prompt\n" + f"{image},a\n".encode() * 20000 + b"\xff\xfe broken bytes,b\n" + f"{image},c\n".encode())
    rows = iter(RowSource(m))
    assert next(rows).prompt == "a"
    *_, bad, last = rows
    assert bad.error == f"{m}:20002: unreadable manifest line (not UTF-8 text)" and last.prompt == "c"


def _write(path, rows, outputs=("quality",)):
    with ResultWriter(path, outputs) as w:
        w.write(Result(r, (0.5,), None) for r in rows)


@pytest.mark.parametrize("prompt", ["multi\nline prompt", "café 日本 🎨", 'quoted "x", comma'])
def test_resume_cuts_a_partial_record_at_every_byte_and_keeps_complete_ones(tmp_path, prompt):
    rows = [Row(f"img{i}.png", prompt) for i in range(5)]
    full = tmp_path / "full.csv"
    _write(full, rows)
    data = full.read_bytes()
    header_end = data.index(b"\n") + 1
    for cut in range(header_end, len(data) + 1):
        part = tmp_path / "part.csv"
        part.write_bytes(data[:cut])
        it = iter(rows)
        done = resume_point(part, it, ("quality",))
        kept = part.read_bytes()
        assert data.startswith(kept) and len(_csv(part)) == done  # a prefix of whole records
        assert next(it, None) == (rows[done] if done < len(rows) else None)  # the input continues after them
        assert len(kept) >= cut - len(data) // len(rows) - 2  # at most the cut record was dropped


def test_resume_of_a_file_cut_inside_its_header_starts_over(tmp_path):
    part = tmp_path / "o.csv"
    part.write_bytes(b"image,pro")
    assert resume_point(part, iter([Row("a", "b")]), ("quality",)) == 0 and part.read_bytes() == b""


def test_resume_refuses_an_output_longer_than_the_input(tmp_path):
    out = tmp_path / "o.csv"
    _write(out, [Row("a", "x"), Row("b", "x")])
    with pytest.raises(OutputError, match="more rows than the input"):
        resume_point(out, iter([Row("a", "x")]), ("quality",))


def test_a_second_run_on_the_same_output_refuses_and_names_the_first(scorer, image, tmp_path):
    out = tmp_path / "o.csv"
    with OutputLock(out):
        with pytest.raises(OutputError, match=f"another ipiqa run is writing this output \\(pid {os.getpid()}"):
            scorer.score_files([Row(str(image), "x")], out)
    scorer.score_files([Row(str(image), "x")], out)  # free again once the first run ended
    assert len(_csv(out)) == 1 and not (tmp_path / "o.csv.lock").exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to simulate a full disk")
def test_a_full_disk_gives_one_clear_message_naming_the_file_rows_and_resume(tiny_bundle, image):
    proc = subprocess.run([sys.executable, "-m", "ipiqa.cli", "score", str(tiny_bundle), "--images", str(image),
                           "--prompt", "x", "-o", "/dev/full", "--device", "cpu", "-q"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "/dev/full" in line and "No space left on device" in line and "0 complete rows" in line and "--resume" in line


def test_resume_of_a_parquet_output_is_refused_and_leaves_it_intact(tmp_path):
    pytest.importorskip("pyarrow")
    out = tmp_path / "o.parquet"
    _write(out, [Row(f"img{i}.png", "x") for i in range(50)])
    before = out.read_bytes()
    with pytest.raises(OutputError, match="cannot be resumed"):
        resume_point(out, iter([Row("img0.png", "x")]), ("quality",))
    assert out.read_bytes() == before


def test_an_output_that_is_the_input_manifest_is_refused_before_it_is_touched(scorer, image, tmp_path):
    m = tmp_path / "m.csv"
    m.write_text(f"image,prompt\n{image},a\n", encoding="utf-8")
    before = m.read_bytes()
    with pytest.raises(OutputError, match="the output is the input manifest"):
        scorer.score_files(m, m)
    assert m.read_bytes() == before


def test_an_output_folder_that_cannot_be_created_is_a_clear_error(scorer, image, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot create the output's folder"):
        scorer.score_files([Row(str(image), "a")], tmp_path / "file" / "o.csv")


def test_a_jsonl_record_without_a_prompt_key_is_one_error_row_even_first(scorer, image, tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"image": "%s"}\nnot json\n{"image": "%s", "prompt": "a"}\n' % (image, image))
    summary = scorer.score_files(m, tmp_path / "o.csv")
    got = _csv(tmp_path / "o.csv")
    assert summary.rows == 3 and got[0]["error"].startswith("missing prompt") and not got[2]["error"]


def test_text_that_cannot_be_written_as_utf8_is_an_error_row_and_the_output_stays_utf8(scorer, image, tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"image": "bad\\udc80.png", "prompt": "a"}\n{"image": "%s", "prompt": "b"}\n' % image)
    scorer.score_files(m, tmp_path / "o.jsonl")
    lines = (tmp_path / "o.jsonl").read_bytes().decode("utf-8").splitlines()  # strict: would raise on bad bytes
    assert "not valid UTF-8" in lines[0] and '"error": null' in lines[1]


def test_device_decoding_reads_each_rows_file_and_gives_an_in_memory_row_its_error(image):
    from pathlib import Path

    import numpy as np

    from ipiqa.runtime.pipeline import score_batch

    class Scores:
        resolution, needs_prompt = 8, False

        def score_arrays(self, images, prompts):
            return np.zeros((len(images), 1))

    sent = []

    def device_decode(paths):
        sent.extend(paths)
        return np.zeros((len(paths), 8, 8, 3), np.uint8), [None] * len(paths)

    rows = [Row(str(image), "p"), Row("s.tar::k", "p", source=b"\xff\xd8 jpeg bytes"),
            Row("d.parquet::1", "p", source=Path(image))]  # a Parquet path cell: its file, not its label
    results = score_batch(Scores(), rows, [(None, None)] * 3, device_decode)
    assert sent == [str(image), str(image)]
    assert results[0].scores == results[2].scores == (0.0,)
    assert "--decode device reads image files" in results[1].error and results[1].error.startswith("s.tar::k")
