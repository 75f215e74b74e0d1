"""Each output codec reads back what it writes: what a run writes is what a resumed run parses."""
from __future__ import annotations

import pytest

from ipiqa.runtime.io import OutputError, ResultWriter, Row, resume_point
from ipiqa.runtime.io.formats import CODECS, CsvCodec, JsonlCodec, ParquetCodec
from ipiqa.runtime.rows import Result

OUTPUTS = ("quality", "alignment")
RESULTS = [
    Result(Row("café/日本 🎨.png", 'quoted "x", comma'), (0.1, -2.5), None),
    Result(Row("a,b\n\"c\".png", "multi\nline\r\nprompt"), (1e-300, 3.0), None),
    Result(Row("zero-width\u200b\u00e9.png", None), None, "broken.png: cannot decode, \"bad\"\nheader"),
    Result(Row("tab\there.png", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"), (None, 0.25), None),
    Result(Row("/abs/last.jpg", ""), (0.5, 0.5), ""),
]


def _cell(value):
    """A value as both text formats mean it: an empty CSV cell and a JSON null are the same missing value."""
    return None if value in ("", None) else value


def _scanned(path, codec):
    with open(path, "rb") as fh:
        return [r for _, r in codec.scan(fh, OUTPUTS, path) if r is not None]


def _expected(res):
    scores = res.scores or (None,) * len(OUTPUTS)
    return (res.row.image, _cell(res.row.prompt), *scores, _cell(res.error))


def _as_read(record):
    return (record["image"], _cell(record["prompt"]),
            *(None if _cell(record[o]) is None else float(record[o]) for o in OUTPUTS), _cell(record["error"]))


@pytest.mark.parametrize("fmt, codec", [("csv", CsvCodec), ("jsonl", JsonlCodec)])
def test_what_a_codec_writes_its_scan_reads_back(tmp_path, fmt, codec):
    out = tmp_path / f"o.{fmt}"
    with ResultWriter(out, OUTPUTS) as w:
        w.write(RESULTS[:2])
        w.write(RESULTS[2:])
    assert CODECS[fmt] is codec
    assert [_as_read(r) for r in _scanned(out, codec)] == [_expected(r) for r in RESULTS]
    rows = iter([r.row for r in RESULTS] + [Row("next.png", "x")])
    assert resume_point(out, rows, OUTPUTS) == len(RESULTS) and next(rows).image == "next.png"


@pytest.mark.parametrize("fmt, codec", [("csv", CsvCodec), ("jsonl", JsonlCodec)])
def test_a_truncated_last_record_is_not_complete(tmp_path, fmt, codec):
    out = tmp_path / f"o.{fmt}"
    with ResultWriter(out, OUTPUTS) as w:
        w.write(RESULTS)
    data = out.read_bytes()
    whole = _scanned(out, codec)
    for cut in (1, 2, 5):  # inside the last record: its newline, a score, a multi-byte character or a quote
        out.write_bytes(data[:-cut])
        assert [_as_read(r) for r in _scanned(out, codec)] == [_as_read(r) for r in whole[:-1]]


def test_a_parquet_output_reads_back_and_is_the_one_codec_that_cannot_resume(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "o.parquet"
    with ResultWriter(out, OUTPUTS) as w:
        w.write(RESULTS)
    table = pq.read_table(out).to_pylist()
    assert [_as_read(r) for r in table] == [_expected(r) for r in RESULTS]
    assert [f for f, c in CODECS.items() if c.refusal is not None] == ["parquet"]
    before = out.read_bytes()
    with pytest.raises(OutputError) as by_resume:
        resume_point(out, iter([r.row for r in RESULTS]), OUTPUTS)
    with pytest.raises(OutputError) as by_append:
        ResultWriter(out, OUTPUTS, append=True)
    message = f"{out}: {ParquetCodec.refusal}; use a .csv or .jsonl output for --resume"
    assert str(by_resume.value) == str(by_append.value) == message and out.read_bytes() == before
