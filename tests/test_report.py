"""``ipiqa report``: the page's content without a browser, and the streaming accumulators behind it.

(The page in a real browser: tests/test_report_browser.py.)"""
from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ipiqa.runtime.io import Result, ResultWriter, Row
from ipiqa.runtime.results import collect as collect_module
from ipiqa.runtime.results.collect import ReportOptions, collect, error_cause
from ipiqa.runtime.results.commands import report_cmd
from ipiqa.runtime.results.sets import open_scores
from ipiqa.runtime.results.stats import DecimalHistogram, Extremes, Reservoir

OUTPUTS = ("quality", "alignment")
# (file, prompt, quality, alignment); None scores: an error row with that error text (after "<path>: ").
SCENARIO = [
    ("fox0.png", "a red fox in snow", 0.20, 0.50),
    ("fox1.png", "a red fox in snow", 0.90, 0.70),
    ("car0.png", "a blue car", 0.40, 0.30),
    ("broken.jpg", "a blue car", None, "corrupt image (image file is truncated)"),
    ("fox2.png", "a red fox in snow", 0.50, 0.60),
    ("car1.png", "a blue car", 0.10, 0.20),
    ("gone.png", "a lone tree", None, "file not found"),
    ("tree0.png", "a lone tree", 0.60, 0.90),
    ("fox3.png", "a red fox in snow", 0.70, 0.40),
    ("car2.png", "a blue car", 0.75, 0.80),
]
BY_QUALITY = sorted((r for r in SCENARIO if r[2] is not None), key=lambda r: r[2])


def write_scenario(folder: Path, fmt: str = "csv", rows=SCENARIO) -> Path:
    """Small PNGs (one colour each) and the scores file ``ipiqa score`` would write for them, by its own writer."""
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    for i, (name, prompt, q, a) in enumerate(rows):
        path = folder / name
        if q is not None:
            Image.new("RGB", (96, 64), (20 * i % 256, 200, 40)).save(path)
            results.append(Result(Row(str(path), prompt), (q, a)))
        else:
            results.append(Result(Row(str(path), prompt), None, f"{path}: {a}"))
    out = folder / f"scores.{fmt}"
    with ResultWriter(out, OUTPUTS) as writer:
        writer.write(results)
    return out


class Cards(HTMLParser):
    """The page's galleries: gallery name -> [(row index, image path)] in page order; also every img src."""

    def __init__(self) -> None:
        super().__init__()
        self.galleries: dict[str, list[tuple[int, str]]] = {}
        self.current: list[str] = []
        self.srcs: list[str] = []
        self.scripts_src: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "data-gallery" in a:
            self.current.append(a["data-gallery"])
            self.galleries[a["data-gallery"]] = []
        if tag == "figure" and self.current:
            self.galleries[self.current[-1]].append((int(a["data-index"]), a["data-image"]))
        if tag == "img":
            self.srcs.append(a.get("src", ""))
        if tag in ("script", "link", "iframe") and (a.get("src") or a.get("href")):
            self.scripts_src.append(a.get("src") or a.get("href"))

    def handle_endtag(self, tag):
        if tag == "div" and self.current:
            # galleries hold only figures, so the first closing div after one opens is its own
            self.current.pop()


def page_of(scores: Path, *args: str) -> tuple[str, Cards]:
    out = scores.parent / "report.html"
    result = CliRunner().invoke(report_cmd, [str(scores), "-o", str(out), "-q", *args])
    assert result.exit_code == 0, result.output
    html = out.read_text(encoding="utf-8")
    cards = Cards()
    cards.feed(html)
    return html, cards


def test_page_is_one_offline_file_with_small_embedded_jpeg_thumbnails(tmp_path):
    html, cards = page_of(write_scenario(tmp_path))
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html, re.I), "a network URL in the page"
    assert cards.scripts_src == [], "the page loads an external script or stylesheet"
    assert cards.srcs and all(s.startswith("data:image/jpeg;base64,") for s in cards.srcs)
    thumb = Image.open(io.BytesIO(base64.b64decode(cards.srcs[0].split(",", 1)[1])))
    assert thumb.format == "JPEG" and max(thumb.size) <= 160
    assert "<svg" in html and "<script>" in html


def test_summary_counts_rows_scored_and_errors_by_cause(tmp_path):
    html, _ = page_of(write_scenario(tmp_path))
    assert "<td>rows</td><td>10</td>" in html and "<td>scored</td><td>8</td>" in html
    assert "<td>errors</td><td>2</td>" in html
    causes = re.search(r'<table id="causes">(.*?)</table>', html).group(1)
    assert "<td>corrupt image</td><td>1</td>" in causes and "<td>file not found</td><td>1</td>" in causes
    assert "not recorded: no run record beside the scores" in html  # no record, no --bundle: says so rather than guessing


def test_worst_and_best_galleries_are_in_score_order(tmp_path):
    _, cards = page_of(write_scenario(tmp_path), "-n", "3")
    names = lambda key: [Path(p).name for _, p in cards.galleries[key]]  # noqa: E731
    assert names("worst") == [r[0] for r in BY_QUALITY[:3]]
    assert names("best") == [r[0] for r in BY_QUALITY[::-1][:3]]
    assert names("sample") == [r[0] for r in BY_QUALITY[::-1]]  # sample of 96 >= 8 rows: all, best first


def test_best_of_n_ranks_each_prompt_widest_spread_first(tmp_path):
    _, cards = page_of(write_scenario(tmp_path), "--per-prompt", "3")
    fox = [Path(p).name for _, p in cards.galleries["prompt-0"]]  # fox spreads 0.7, car 0.65
    car = [Path(p).name for _, p in cards.galleries["prompt-1"]]
    assert fox == ["fox1.png", "fox3.png", "fox2.png"] and car == ["car2.png", "car0.png", "car1.png"]
    assert "prompt-2" not in cards.galleries  # the lone tree has one image: nothing to rank


def test_ranking_by_the_second_output(tmp_path):
    _, cards = page_of(write_scenario(tmp_path), "--by", "alignment", "-n", "2")
    assert [Path(p).name for _, p in cards.galleries["best"]] == ["tree0.png", "car2.png"]


def test_every_error_row_is_listed_with_its_cause_up_to_the_bound(tmp_path):
    rows = SCENARIO + [(f"bad{i}.jpg", "p", None, "not a readable image") for i in range(6)]
    html, _ = page_of(write_scenario(tmp_path, rows=rows), "--errors", "3")
    table = re.search(r'<table class="err">(.*?)</table>', html).group(1)
    assert table.count("<tr>") == 1 + 3 and "corrupt image (image file is truncated)" in table
    assert "The first 3 of 8 error rows" in html
    assert "<td>not a readable image</td><td>6</td>" in html  # the causes count them all


def test_user_text_cannot_become_markup_or_script(tmp_path):
    evil = '</script><img src=x onerror="alert(1)">'
    html, cards = page_of(write_scenario(tmp_path, rows=[("a.png", evil, 0.5, 0.5), ("b.png", evil, 0.4, 0.4)]))
    assert evil not in html and "&lt;/script&gt;&lt;img src=x" in html
    assert all(s.startswith("data:") for s in cards.srcs)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_jsonl_and_parquet_give_the_same_report_data_as_csv(tmp_path, fmt):
    if fmt == "parquet":
        pytest.importorskip("pyarrow", reason="Parquet needs ipiqa[parquet]")
    ref = collect(open_scores(write_scenario(tmp_path / "csv")))
    other = collect(open_scores(write_scenario(tmp_path / fmt, fmt)))
    assert other.fmt == fmt and (other.rows, other.scored, other.causes) == (ref.rows, ref.scored, ref.causes)
    strip = lambda rows: [(r.index, Path(r.image).name, r.prompt, r.scores) for r in rows]  # noqa: E731
    assert strip(other.worst) == strip(ref.worst) and strip(other.best) == strip(ref.best)
    assert [s.histogram for s in other.summaries] == [s.histogram for s in ref.summaries]


def test_a_killed_runs_partial_last_record_is_reported_not_parsed(tmp_path):
    scores = write_scenario(tmp_path)
    data = scores.read_bytes()
    scores.write_bytes(data[: len(data) - 7])  # cut inside the last record
    html, _ = page_of(scores)
    assert "<td>rows</td><td>9</td>" in html and "partial record" in html


def test_relative_image_paths_resolve_like_the_scoring_run_or_under_images_root(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    write_scenario(folder)
    rel = tmp_path / "rel.csv"  # the paths a run from tmp_path with a manifest in imgs/ writes: imgs/fox0.png
    with ResultWriter(rel, OUTPUTS) as w:
        w.write([Result(Row(f"imgs/{n}", p), (q, a)) for n, p, q, a in SCENARIO if q is not None])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    html, cards = page_of(rel)
    assert not cards.srcs and "no preview: imgs/fox0.png: file not found" in html.replace(str(elsewhere) + "/", "")
    _, cards = page_of(rel, "--images-root", str(tmp_path))
    assert len(cards.srcs) > 0 and all(s.startswith("data:image/jpeg") for s in cards.srcs)


def test_not_a_scores_file_is_one_clear_error(tmp_path):
    manifest = tmp_path / "images.csv"
    manifest.write_text("image,prompt\na.png,a cat\n", encoding="utf-8")
    result = CliRunner().invoke(report_cmd, [str(manifest), "-o", str(tmp_path / "r.html")])
    assert result.exit_code == 1 and "not a scores file" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(report_cmd, [str(write_scenario(tmp_path / "s")), "--by", "sharpness", "-o",
                                             str(tmp_path / "r.html")])
    assert result.exit_code == 1 and "'sharpness'" in result.output and "quality" in result.output
    edited = tmp_path / "edited.csv"
    edited.write_text("image,prompt,quality,error\na.png,a cat,0.5,\nb.png,a cat,high,\n", encoding="utf-8")
    result = CliRunner().invoke(report_cmd, [str(edited), "-o", str(tmp_path / "r.html")])
    assert result.exit_code == 1 and "row 2 ('b.png') has no error and unreadable scores" in result.output


def test_histograms_count_every_row_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(collect_module, "CHUNK", 3)  # many flushes in a 10-row file
    data = collect(open_scores(write_scenario(tmp_path)))
    q = np.array([r[2] for r in SCENARIO if r[2] is not None])
    h = data.summaries[0].histogram
    assert h.total == data.scored == 8
    edges = [h.edge(i) for i in range(len(h.counts) + 1)]
    assert list(h.counts) == [int(((q >= lo) & (q < hi)).sum()) for lo, hi in zip(edges, edges[1:])]
    assert data.summaries[0].mean == pytest.approx(q.mean()) and data.summaries[0].std == pytest.approx(q.std())
    a = np.array([r[3] for r in SCENARIO if r[2] is not None])
    assert data.pearson == pytest.approx(np.corrcoef(q, a)[0, 1])


def test_decimal_histogram_is_exact_bounded_and_one_pass():
    rng = np.random.default_rng(0)
    for values in (rng.random(5000), rng.normal(3, 0.01, 5000), rng.random(3000) * 400 - 100, np.array([0.6, 0.6, 0.61])):
        h = DecimalHistogram(max_bins=60)
        for chunk in np.array_split(values, 9):  # the range grows chunk by chunk: bins merge, counts stay exact
            h.add(chunk)
        r = h.result()
        assert 1 <= len(r.counts) <= 60 and r.total == len(values)
        edges = [r.edge(i) for i in range(len(r.counts) + 1)]
        assert list(r.counts) == [int(((values >= a) & (values < b)).sum()) for a, b in zip(edges, edges[1:])]
        mid = edges[len(edges) // 2]
        assert r.at_least(mid) == int((values >= mid).sum())  # exact at every bin edge (the slider's steps)
        assert re.fullmatch(r"[12](e-\d+|(\.0)?|0*(\.0)?)|0\.0*[12]|[12]0*\.0", r.width_text), r.width_text


def test_extremes_keep_the_n_lowest_and_highest_with_ties_in_file_order():
    e = Extremes(2)
    for i, v in enumerate([5, 1, 1, 9, 3, 9, 0]):
        e.add(v, i, i)
    assert e.lowest() == [6, 1] and e.highest() == [3, 5]


def test_reservoir_sample_is_uniform_seeded_and_bounded():
    counts = np.zeros(40)
    for seed in range(2000):
        r = Reservoir(4, seed)
        for i in range(40):
            r.add(i)
        assert len(set(r.items)) == 4
        counts[r.items] += 1
    assert counts.min() > 0.7 * 200 and counts.max() < 1.3 * 200  # 2000 * 4 / 40 = 200 each
    a, b = Reservoir(3, 7), Reservoir(3, 7)
    for i in range(100):
        a.add(i), b.add(i)
    assert a.items == b.items


def test_error_causes_drop_the_file_name_and_details():
    assert error_cause("x/a.jpg", "x/a.jpg: corrupt image (truncated)") == "corrupt image"
    assert error_cause("a.jpg", "missing prompt: IP-IQA scores an image against its prompt") == "missing prompt"
    assert error_cause("a.jpg", "scoring failed: RuntimeError: boom") == "scoring failed"


def test_report_benchmark_returns_size_and_time(tmp_path):
    from benchmarks.report_bench import measure_report

    out = measure_report(tmp_path, sizes=(2000,), images=4, shard_samples=32)
    one, many = out["sizes"]
    assert one["rows"] == 2000 and one["report_mb"] > 0 and one["report_seconds"] > 0
    assert one["select_kept"] == many["select_kept"] == 500  # 4 images per prompt, best 1 each (no prompt all errors)
    assert (one["input"], many["input"]) == ("one file", "64 files") and "| 2,000 |" in out["markdown"]
    assert out["to_shards"]["kept"] > 0 and out["to_shards"]["written_mb"] > 0


def test_report_and_select_never_import_torch(tmp_path):
    """The runtime's torch-free boundary: both commands run on a base install."""
    import subprocess
    import sys

    scores = write_scenario(tmp_path)
    code = ("import sys\nfrom ipiqa.runtime.results.commands import report_cmd, select_cmd\n"
            f"report_cmd.main([{str(scores)!r}, '-o', {str(tmp_path / 'r.html')!r}, '-q'], standalone_mode=False)\n"
            f"select_cmd.main([{str(scores)!r}, '-o', {str(tmp_path / 'k.csv')!r}, '--top-k', '1'], standalone_mode=False)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "r.html").is_file() and (tmp_path / "k.csv").is_file()


def test_bundle_details_are_shown_and_a_foreign_bundle_is_refused(tmp_path, tiny_bundle):
    html, _ = page_of(write_scenario(tmp_path / "a"), "--bundle", str(tiny_bundle))
    assert "<td>bundle precision</td><td>fp32</td>" in html and f"<td>{tiny_bundle}</td>" in html
    other = tmp_path / "mos.csv"
    with ResultWriter(other, ("mos",)) as w:
        w.write([Result(Row("a.png", "p"), (0.5,))])
    result = CliRunner().invoke(report_cmd, [str(other), "-o", str(tmp_path / "r.html"), "--bundle", str(tiny_bundle)])
    assert result.exit_code == 1 and "give the bundle that wrote these scores" in result.output


@pytest.mark.parametrize("cell, why", [("shard-000.tar::000017", "an image inside a shard; pass --shard-previews"),
                                       ("train.parquet::7", "an image inside a Parquet file")])
def test_rows_inside_shards_and_parquet_files_get_a_placeholder_that_says_why(tmp_path, cell, why):
    scores = tmp_path / "refs.csv"
    with ResultWriter(scores, OUTPUTS) as w:
        w.write([Result(Row(str(tmp_path / cell), "a cat"), (0.5, 0.5))])
    html, cards = page_of(scores)
    assert not cards.srcs and why in html


def test_shard_previews_read_each_shard_once_up_to_its_last_shown_key(tmp_path, monkeypatch):
    import tarfile

    from ipiqa.runtime.results import thumbs as thumbs_module
    from test_shards import good_samples, write_shard

    full = write_shard(tmp_path / "a.tar", good_samples(0, 3))
    with tarfile.open(tmp_path / "a.tar") as tf:
        cut = next(m.offset for m in tf.getmembers() if m.name == "000002.jpg") + 700
    (tmp_path / "a.tar").write_bytes(full[:cut])  # past the shown keys, the shard is garbage: never reached
    write_shard(tmp_path / "b.tar", good_samples(10, 2))
    scores = tmp_path / "s.csv"
    rows = [(tmp_path / "a.tar", 0), (tmp_path / "a.tar", 1), (tmp_path / "b.tar", 10), (tmp_path / "b.tar", 11)]
    with ResultWriter(scores, OUTPUTS) as w:
        w.write([Result(Row(f"{shard}::{i:06d}", "p"), (0.1 * n, 0.5)) for n, (shard, i) in enumerate(rows)])
    read: dict[str, int] = {}
    real = thumbs_module.shard_rows

    def counted(shard):
        read[Path(shard).name] = 0
        for row in real(shard):
            read[Path(shard).name] += 1
            yield row

    monkeypatch.setattr(thumbs_module, "shard_rows", counted)
    html, cards = page_of(scores, "--shard-previews")
    assert len(set(cards.srcs)) == 4 and all(s.startswith("data:image/jpeg") for s in cards.srcs)
    assert "no preview" not in html
    assert read == {"a.tar": 2, "b.tar": 2}  # each shard once, a.tar left after its last shown key
