"""WebDataset shards: samples grouped by key, one row each, the row rules for bad members and cut shards, and
one output per shard that appears only when complete (rerun skips it; a shard claimed elsewhere is left alone)."""
from __future__ import annotations

import fcntl
import io
import json
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import read_csv, same_model_tolerance
from ipiqa.cli import EXIT_ROW_ERRORS, cli
from ipiqa.errors import IPIQAError
from ipiqa.runtime.io import Row, RowSource
from ipiqa.runtime.io.partitions import score_partitions
from ipiqa.runtime.io.shards import sample_key, shard_rows


def jpeg(seed: int, size=(48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shard(path, members) -> bytes:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def good_samples(start: int, n: int, ext="jpg"):
    members = []
    for i in range(start, start + n):
        members += [(f"{i:06d}.{ext}", jpeg(i)), (f"{i:06d}.txt", f"prompt {i % 3}".encode())]
    return members


def outputs(folder) -> list[str]:
    """A folder's score files, by name: each one's run record (``NAME.run.json``, io.provenance) left out."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".run.json"))


def cli_run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three shards of 4 good samples each (keys 0-11) under one folder."""
    d = tmp_path_factory.mktemp("shards")
    for s in range(3):
        write_shard(d / f"{s:05d}.tar", good_samples(4 * s, 4))
    return d


# ---------------------------------------------------------------- naming and grouping


def test_the_key_is_the_name_up_to_the_first_dot_of_the_base_name():
    assert sample_key("dir.v2/000017.seg.PNG") == ("dir.v2/000017", "seg.png")
    assert sample_key("000017.jpg") == ("000017", "jpg")


def test_a_member_with_a_multi_part_extension_is_its_samples_image(tmp_path):
    write_shard(tmp_path / "s.tar", [("a.b.c.jpg", jpeg(1)), ("a.txt", b"p"),
                                     ("m.jpg", jpeg(2)), ("m.seg.png", jpeg(3)), ("m.txt", b"q")])
    rows = list(shard_rows(str(tmp_path / "s.tar")))
    assert [r.error for r in rows] == [None, None]
    assert rows[0].source == jpeg(1) and rows[1].source == jpeg(2)  # KEY.jpg beside a KEY.seg.png mask: the image


def test_streaming_a_shard_does_not_accumulate_its_members(tmp_path, monkeypatch):
    write_shard(tmp_path / "many.tar", [(f"{i:05d}.txt", b"x") for i in range(500)])
    opened = []
    real_open = tarfile.open

    def spy(*args, **kwargs):
        opened.append(real_open(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(tarfile, "open", spy)
    assert len(list(shard_rows(str(tmp_path / "many.tar")))) == 500
    assert len(opened[0].members) <= 1  # tarfile's stream mode keeps every TarInfo unless the reader clears them


def test_a_pattern_a_glob_a_folder_and_a_list_file_name_the_same_rows(shards, tmp_path):
    listing = tmp_path / "shards.txt"
    listing.write_text("".join(f"{shards}/{s:05d}.tar\n" for s in range(3)))
    pattern = RowSource(f"{shards}/{{00000..00002}}.tar")
    want = [f"{shards}/{s:05d}.tar::{i:06d}" for s in range(3) for i in range(4 * s, 4 * s + 4)]
    assert [r.image for r in pattern] == want and pattern.kind == "shards" and len(pattern.partitions) == 3
    for other in (f"{shards}/*.tar", shards, listing):
        assert [r.image for r in RowSource(other)] == want


def test_prompt_comes_from_txt_then_the_json_field_then_the_default(tmp_path):
    path = tmp_path / "p.tar"
    write_shard(path, [("a.jpg", jpeg(1)), ("a.txt", b"from txt\n"), ("a.json", b'{"caption": "from json"}'),
                       ("b.jpg", jpeg(2)), ("b.json", b'{"caption": "from json"}'),
                       ("c.jpg", jpeg(3)), ("c.json", b'{"other": 1}'),
                       ("d.jpg", jpeg(4)), ("d.txt", b"   ")])
    rows = list(RowSource(path, "default", prompt_field="caption"))
    assert [r.prompt for r in rows] == ["from txt", "from json", "default", "default"]
    assert [r.prompt for r in RowSource(path)][1:] == [None, None, None]  # no field, no --prompt: missing prompt
    assert all(isinstance(r.source, bytes) for r in rows)  # the member's bytes, not a path


def test_bad_samples_are_error_rows_and_the_rest_are_kept(tmp_path):
    path = tmp_path / "bad.tar"
    write_shard(path, [("a.jpg", jpeg(1)), ("a.txt", b"a"), ("n.txt", b"no image here"),
                       ("j.jpg", jpeg(2)), ("j.json", b"{not json"),
                       ("a.jpg", jpeg(3)), ("t.png", jpeg(4)), ("t.jpg", jpeg(5)), ("z.jpg", jpeg(6))])
    rows = list(shard_rows(str(path), "p"))
    assert [r.image.split("::")[1] for r in rows] == ["a", "n", "j", "a", "t", "z"]
    errors = [r.error for r in rows]
    assert errors[0] is None and errors[5] is None
    assert "no image member (found txt)" in errors[1]
    assert "j.json: unreadable JSON" in errors[2]
    assert "duplicate key" in errors[3] and "first at byte 0" in errors[3]
    assert "2 image members (jpg, png)" in errors[4]


@pytest.mark.parametrize("where", ["inside a member", "inside a header", "at a header boundary"])
def test_a_cut_shard_keeps_the_rows_before_the_cut_and_ends_with_one_error_row(tmp_path, where):
    """Rows of samples known complete are kept; the sample being read at the cut (its next member may be the one
    lost) and everything after it is one error row naming the byte where the lost part starts."""
    full = write_shard(tmp_path / "full.tar", good_samples(0, 4))
    with tarfile.open(tmp_path / "full.tar") as tf:
        starts = {m.name[:6]: m.offset for m in reversed(tf.getmembers())}  # each sample's first header
    cut, kept, lost = {"inside a member": (starts["000002"] + 612, 2, "000002"),
                       "inside a header": (starts["000002"] + 100, 1, "000001"),
                       "at a header boundary": (starts["000002"], 1, "000001")}[where]
    (tmp_path / "cut.tar").write_bytes(full[:cut])
    rows = list(shard_rows(str(tmp_path / "cut.tar")))
    assert [r.image for r in rows[:-1]] == [f"{tmp_path}/cut.tar::{i:06d}" for i in range(kept)]
    assert all(r.error is None for r in rows[:-1])
    assert rows[-1].image == f"{tmp_path}/cut.tar::<truncated at byte {starts[lost]}>"
    assert f"truncated or corrupt at byte {starts[lost]}" in rows[-1].error


def test_a_complete_shard_has_no_error_row(tmp_path):
    write_shard(tmp_path / "ok.tar", good_samples(0, 3))
    assert [r.error for r in shard_rows(str(tmp_path / "ok.tar"))] == [None] * 3


@pytest.mark.parametrize("content", [b"", b"image,prompt\na.jpg,x\n" * 40, b"\x89PNG\r\n\x1a\n" + bytes(600)])
def test_a_file_that_is_not_a_tar_is_refused_in_one_line_naming_it(tiny_model_file, tmp_path, content):
    (tmp_path / "00000.tar").write_bytes(content)
    res = cli_run("score", tiny_model_file, "--images", tmp_path / "00000.tar", "--prompt", "x", "-q")
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"{tmp_path}/00000.tar: not a tar shard" in res.output


def test_a_missing_shard_of_a_pattern_is_refused_naming_it(tiny_model_file, shards):
    res = cli_run("score", tiny_model_file, "--images", f"{shards}/{{00000..00004}}.tar", "-q")
    assert res.exit_code == 1 and f"{shards}/00003.tar: no such shard" in res.output and "2 of 5" in res.output


# ---------------------------------------------------------------- scoring: CLI, API, per-shard outputs


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Two shards: good samples, a corrupt member, a sample without image, a missing prompt, a duplicate key,
    and a second shard cut in its third sample; plus the same good images as loose files."""
    d = tmp_path_factory.mktemp("mixed")
    loose = d / "loose"
    loose.mkdir()
    first = good_samples(0, 3) + [("bad.jpg", b"\xff\xd8\xff not a jpeg"), ("bad.txt", b"x"), ("noimg.txt", b"x"),
                                  ("noprompt.jpg", jpeg(50)), ("000001.jpg", jpeg(51)), ("000001.txt", b"dup")]
    write_shard(d / "00000.tar", first)
    full = write_shard(d / "full.tar", good_samples(3, 4, ext="png"))
    with tarfile.open(d / "full.tar") as tf:
        cut = [m for m in tf.getmembers() if m.name.startswith("000005")][0].offset + 700
    (d / "00001.tar").write_bytes(full[:cut])
    (d / "full.tar").unlink()
    for i in range(5):
        (loose / f"{i:06d}.jpg").write_bytes(jpeg(i))
    return d


def _manifest_of_loose(mixed, tmp_path):
    m = tmp_path / "loose_manifest.csv"
    m.write_text("image,prompt\n" + "".join(f"{mixed}/loose/{i:06d}.jpg,prompt {i % 3}\n" for i in range(5)))
    return m


def test_cli_scores_every_sample_once_in_order_with_errors_only_where_the_input_is_bad(
        tiny_model_file, mixed, tmp_path):
    res = cli_run("score", tiny_model_file, "--images", f"{mixed}/{{00000..00001}}.tar", "-o", tmp_path / "o.csv",
                  "--batch", "3", "-q")
    assert res.exit_code == EXIT_ROW_ERRORS, res.output
    rows = read_csv(tmp_path / "o.csv")
    s0, s1 = f"{mixed}/00000.tar", f"{mixed}/00001.tar"
    assert [r["image"] for r in rows] == [f"{s0}::000000", f"{s0}::000001", f"{s0}::000002", f"{s0}::bad",
                                          f"{s0}::noimg", f"{s0}::noprompt", f"{s0}::000001", f"{s1}::000003",
                                          f"{s1}::000004", rows[9]["image"]]
    errors = [r["error"] for r in rows]
    assert errors[:3] == ["", "", ""] and errors[7:9] == ["", ""]
    assert errors[3] == f"{s0}::bad: not a readable image"  # the file path rule, named by the row
    assert "no image member" in errors[4] and "missing prompt" in errors[5] and "duplicate key" in errors[6]
    assert rows[9]["image"].startswith(f"{s1}::<truncated at byte ") and "truncated or corrupt" in errors[9]
    assert len(rows) == 10


def test_shard_rows_score_like_the_same_images_as_loose_files(scorer, tiny_model_file, mixed, tmp_path):
    scorer.score_files(f"{mixed}/00000.tar", tmp_path / "shard.csv", batch_size=4)
    scorer.score_files(_manifest_of_loose(mixed, tmp_path), tmp_path / "loose.csv", batch_size=4)
    shard, loose = read_csv(tmp_path / "shard.csv")[:3], read_csv(tmp_path / "loose.csv")[:3]
    tolerance = same_model_tolerance(tiny_model_file, [r["image"] for r in loose], [r["prompt"] for r in loose])
    for a, b in zip(shard, loose):
        assert a["prompt"] == b["prompt"] and not a["error"]
        assert abs(float(a["quality"]) - float(b["quality"])) <= tolerance


def test_the_python_api_takes_a_row_source_with_its_options(scorer, tmp_path):
    path = tmp_path / "c.tar"
    write_shard(path, [("a.jpg", jpeg(1)), ("a.json", b'{"caption": "a fox"}'), ("b.jpg", jpeg(2))])
    summary = scorer.score_files(RowSource(path, prompt_field="caption"), tmp_path / "o.jsonl")
    out = [json.loads(line) for line in open(tmp_path / "o.jsonl")]
    assert summary.rows == 2 and out[0]["prompt"] == "a fox" and out[0]["error"] is None
    assert "missing prompt" in out[1]["error"]
    with pytest.raises(IPIQAError, match="decode device reads image files"):  # nvJPEG reads files, not members
        RowSource(path).refuse_run(True, tmp_path / "d.csv", device_decode=True)


def test_the_output_may_not_be_one_of_the_input_shards(scorer, mixed, tmp_path):
    import shutil

    shutil.copy(mixed / "00000.tar", tmp_path / "x.tar")
    with pytest.raises(IPIQAError, match="the output is an input file"):
        scorer.score_files(RowSource(tmp_path / "x.tar", "p"), tmp_path / "x.tar", fmt="csv")
    assert (tmp_path / "x.tar").read_bytes() == (mixed / "00000.tar").read_bytes()


def test_single_output_resume_after_a_kill_gives_the_uninterrupted_rows(tiny_model_file, shards, tmp_path):
    args = ["score", tiny_model_file, "--images", f"{shards}/{{00000..00002}}.tar", "--batch", "2", "-q"]
    assert cli_run(*args, "-o", tmp_path / "full.csv").exit_code == 0
    data = (tmp_path / "full.csv").read_bytes()
    (tmp_path / "cut.csv").write_bytes(data[:len(data) * 2 // 3])  # a killed run: some rows and half of one
    res = cli_run(*args, "-o", tmp_path / "cut.csv", "--resume")
    assert res.exit_code == 0 and "already done" in res.output
    assert [r["image"] for r in read_csv(tmp_path / "cut.csv")] == [r["image"] for r in read_csv(tmp_path / "full.csv")]


def test_output_dir_writes_one_file_per_shard_and_a_rerun_skips_complete_ones(tiny_model_file, shards, tmp_path):
    out = tmp_path / "out"
    args = ["score", tiny_model_file, "--images", f"{shards}/*.tar", "--output-dir", out, "-q"]
    res = cli_run(*args)
    assert res.exit_code == 0, res.output
    assert outputs(out) == ["00000.csv", "00001.csv", "00002.csv"]  # no partial, no claim
    for s in range(3):
        assert [r["image"] for r in read_csv(out / f"{s:05d}.csv")] == [
            f"{shards}/{s:05d}.tar::{i:06d}" for i in range(4 * s, 4 * s + 4)]
    (out / "00001.csv").unlink()
    (out / "00002.csv").write_text("left alone\n")  # a complete file is never read or rewritten
    res = cli_run(*args)
    assert "1 scored now (4 rows" in res.output and "2 already complete" in res.output
    assert (out / "00002.csv").read_text() == "left alone\n" and len(read_csv(out / "00001.csv")) == 4


def test_a_shard_claimed_by_another_run_is_left_to_it(scorer, shards, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".00001.csv.lock", "w") as held:  # another machine is scoring shard 1
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        summary = score_partitions(scorer, RowSource(f"{shards}/*.tar"), out)
    assert (summary.scored, summary.busy, summary.rows) == (2, 1, 8)
    assert not (out / "00001.csv").exists() and (out / "00000.csv").is_file() and (out / "00002.csv").is_file()


def test_a_partial_file_left_by_a_killed_run_is_continued_not_duplicated(scorer, shards, tmp_path):
    whole, out = tmp_path / "whole", tmp_path / "out"
    score_partitions(scorer, RowSource(f"{shards}/00000.tar"), whole)
    lines = (whole / "00000.csv").read_bytes().splitlines(keepends=True)
    header, first, second, third = lines[:4]
    cells = first.split(b",")
    cells[2] = b"0.125"  # a mark: a continued file keeps the rows it had, a rewritten one would not
    out.mkdir()
    (out / ".00000.csv.partial").write_bytes(header + b",".join(cells) + second + third[:10])  # killed mid-row
    summary = score_partitions(scorer, RowSource(f"{shards}/00000.tar"), out)
    assert summary.scored == 1 and summary.rows == 4
    got = read_csv(out / "00000.csv")
    assert [r["image"] for r in got] == [r["image"] for r in read_csv(whole / "00000.csv")]  # each row once
    assert got[0]["quality"] == "0.125" and not (out / ".00000.csv.partial").exists()


def test_two_inputs_of_one_name_are_refused_for_one_output_dir(scorer, shards, tmp_path):
    other = tmp_path / "b"
    other.mkdir()
    write_shard(other / "00000.tar", good_samples(0, 1))
    listing = tmp_path / "list.txt"
    listing.write_text(f"{shards}/00000.tar\n{other}/00000.tar\n")
    with pytest.raises(IPIQAError, match="would both write"):
        score_partitions(scorer, RowSource(listing), tmp_path / "out")


def test_options_for_another_kind_of_input_are_refused(tiny_model_file, shards, tmp_path):
    res = cli_run("score", tiny_model_file, "--images", shards, "--image-column", "img", "-q")
    assert res.exit_code == 1 and "--image-column/--prompt-column name Parquet columns" in res.output
    res = cli_run("score", tiny_model_file, "--images", shards, "-o", tmp_path / "o.csv", "--output-dir", tmp_path)
    assert res.exit_code == 1 and "not both" in res.output


def starts_of(path, key):
    with tarfile.open(path) as tf:
        return [m for m in tf.getmembers() if m.name.startswith(key)][0].offset


def test_a_shard_is_read_as_a_stream_not_loaded_first(tmp_path):
    """The reader holds one sample: a shard corrupted on disk after the first row was read shows the damage."""
    path = tmp_path / "big.tar"
    write_shard(path, good_samples(0, 60))
    late = starts_of(path, "000040")
    rows = shard_rows(str(path))
    assert next(rows).image.endswith("::000000")
    with open(path, "r+b") as fh:  # overwrite sample 40's header in place, after reading began
        fh.seek(late)
        fh.write(b"\x01" * 512)
    rest = list(rows)
    assert len(rest) == 39 and rest[-1].image.endswith("::<truncated at byte %d>" % starts_of(path, "000039"))


def test_the_shards_benchmark_reports_every_source_and_each_shard_count(tiny_bundle, tmp_path):
    from benchmarks.shards import section

    result = section(tmp_path, resolution=64, side=64, images=8, shards=2, repeats=1, shard_counts=(1, 2),
                     per_shard=4, bundle=tiny_bundle)
    assert [r["source"] for r in result["rates"]] == ["loose files", "tar shards", "parquet bytes"]
    assert all(r["rows"] == 8 and r["rows_per_s"] > 0 for r in result["rates"])
    assert [(m["shards"], m["rows"]) for m in result["memory"]] == [(1, 4), (2, 8)]
    assert "peak RSS" in result["markdown"]


def test_an_image_member_above_the_encoded_size_limit_is_an_error_row_never_read(tmp_path, monkeypatch):
    import ipiqa.preprocess as preprocess

    big, small = jpeg(1, size=(64, 64)), jpeg(2)
    monkeypatch.setattr(preprocess, "MAX_IMAGE_BYTES", (len(big) + len(small)) // 2)
    write_shard(tmp_path / "s.tar", [("a.jpg", big), ("a.txt", b"a cat"), ("b.jpg", small), ("b.txt", b"a dog")])
    read = []
    real = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: read.append(m.name) or real(self, m))
    rows = list(shard_rows(str(tmp_path / "s.tar")))
    assert "MAX_IMAGE_BYTES" in rows[0].error and rows[0].source is None
    assert rows[1].error is None and rows[1].source == small
    assert "a.jpg" not in read
