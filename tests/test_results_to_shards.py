"""``ipiqa select ... --to-shards DIR``: kept samples copied, every member, into new WebDataset shards."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from ipiqa.runtime.io import Result, ResultWriter, Row
from ipiqa.runtime.results.commands import select_cmd
from ipiqa.runtime.results.select import Selection, write_selection
from test_shards import jpeg, write_shard

OUTPUTS = ("quality", "alignment")


def sample(key: str, seed: int, extra=()):
    return [(f"{key}.jpg", jpeg(seed)), (f"{key}.txt", f"prompt {seed % 2}".encode()),
            (f"{key}.json", json.dumps({"url": f"http://x/{key}"}).encode()), *extra]


def make_shards(folder: Path, per_shard=4, shards=2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        path = folder / f"{s:05d}.tar"
        members = []
        for i in range(per_shard):
            members += sample(f"{s}{i:05d}", 10 * s + i, extra=[(f"{s}{i:05d}.seg.png", b"mask%d" % i)])
        write_shard(path, members)
        paths.append(path)
    return paths


def write_scores(path: Path, labels_scores) -> Path:
    """A scores file as a shard run writes it: ``SHARD::KEY`` rows (None scores: an error row)."""
    with ResultWriter(path, OUTPUTS) as writer:
        writer.write([Result(Row(label, "p"), s) if s is not None else Result(Row(label, "p"), None, f"{label}: bad")
                      for label, s in labels_scores])
    return path


def members(tar: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def scored_shards(tmp_path, per_shard=4, shards=2):
    paths = make_shards(tmp_path / "shards", per_shard, shards)
    rows = [(f"{p}::{p.stem[-1]}{i:05d}", (0.1 * i + 0.05 * s, 0.5)) for s, p in enumerate(paths) for i in range(per_shard)]
    return paths, write_scores(tmp_path / "scores.csv", rows)


def select(scores, *args):
    res = CliRunner().invoke(select_cmd, [str(scores), *map(str, args)])
    return res


def test_kept_samples_keep_every_member_and_gain_a_scores_member(tmp_path):
    (src, _), scores = scored_shards(tmp_path)
    res = select(scores, "--min", "quality=0.2", "--to-shards", tmp_path / "out")
    assert res.exit_code == 0, res.output
    got = members(tmp_path / "out" / "00000.tar")
    original = dict(members(src))
    kept = ["000002", "000003", "100002", "100003"]  # 0.2, 0.3 of shard 0; 0.25, 0.35 of shard 1
    assert [n for n, _ in got] == [f"{k}.{e}" for k in kept for e in ("jpg", "txt", "json", "seg.png", "scores.json")]
    assert all(data == original[name] for name, data in got if name.startswith("0") and not name.endswith("scores.json"))
    record = json.loads(dict(got)["000002.scores.json"])
    assert record == {"source": f"{src}::000002", "prompt": "p", "scores": {"quality": pytest.approx(0.2),
                                                                             "alignment": 0.5}}
    assert "wrote 1 shards" in res.output and "4 samples, 20 members" in res.output


def test_shard_size_splits_the_output_into_numbered_shards_and_leaves_no_partial(tmp_path):
    _, scores = scored_shards(tmp_path, per_shard=4, shards=2)
    res = select(scores, "--min", "quality=0", "--to-shards", tmp_path / "out", "--shard-size", "3")
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar", "00002.tar"]
    counts = [len({n.split(".")[0] for n, _ in members(out / f"{i:05d}.tar")}) for i in range(3)]
    assert counts == [3, 3, 2]


def test_each_source_shard_is_read_once_and_members_are_not_accumulated(tmp_path, monkeypatch):
    _, scores = scored_shards(tmp_path, per_shard=6, shards=3)
    opened, longest = [], [0]
    real_open, real_next = tarfile.open, tarfile.TarFile.next

    def counting_open(*a, **k):
        tf = real_open(*a, **k)
        opened.append(getattr(k.get("fileobj"), "name", a[0] if a else None))
        return tf

    def watched_next(self):
        longest[0] = max(longest[0], len(self.members))
        return real_next(self)

    monkeypatch.setattr(tarfile, "open", counting_open)
    monkeypatch.setattr(tarfile.TarFile, "next", watched_next)
    reads = lambda: [Path(n).name for n in opened if "shards" in str(n)]  # noqa: E731 - source shards opened
    result = write_selection(scores, None, Selection(top_k=1, per="all"), to_shards=tmp_path / "out")
    assert (result.shards.sources, result.shards.reread, reads()) == (1, 0, ["00002.tar"])  # the others: not read
    opened.clear()
    result = write_selection(scores, None, Selection((), None), to_shards=tmp_path / "all")
    assert (result.shards.sources, result.shards.reread, result.shards.samples) == (3, 0, 18)
    assert reads() == ["00000.tar", "00001.tar", "00002.tar"]
    assert longest[0] <= 1  # one TarInfo at a time, whatever the shard's length


def test_rows_of_a_shard_met_again_later_are_read_again_and_counted(tmp_path):
    paths = make_shards(tmp_path / "shards", 2, 2)
    a, b = paths
    scores = write_scores(tmp_path / "s.csv", [(f"{a}::000000", (0.9, 0.5)), (f"{b}::100000", (0.9, 0.5)),
                                               (f"{a}::000001", (0.9, 0.5))])
    result = write_selection(scores, None, Selection((), None), to_shards=tmp_path / "out")
    assert (result.shards.sources, result.shards.reread, result.shards.samples) == (3, 1, 3)


def test_rows_not_from_shards_are_refused_in_one_line_and_nothing_is_left(tmp_path):
    paths = make_shards(tmp_path / "shards", 2, 1)
    scores = write_scores(tmp_path / "s.csv", [(f"{paths[0]}::000000", (0.9, 0.5)), ("photos/a.jpg", (0.9, 0.5))])
    res = select(scores, "--min", "quality=0", "--to-shards", tmp_path / "out", "-o", tmp_path / "keep.csv")
    assert res.exit_code == 1 and "photos/a.jpg: not a shard sample (SHARD::KEY)" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "keep.csv").exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    scores = write_scores(tmp_path / "p.csv", [("data/train.parquet::7", (0.9, 0.5))])  # a Parquet row
    res = select(scores, "--min", "quality=0", "--to-shards", tmp_path / "out")
    assert res.exit_code == 1 and "data/train.parquet::7: not a shard sample" in res.output


def test_a_repeated_key_in_a_source_shard_copies_only_its_first_sample(tmp_path):
    """As the scorer scored only the first (the later one is its error row)."""
    path = tmp_path / "dup.tar"
    write_shard(path, [("k.jpg", jpeg(1)), ("k.txt", b"first"), ("o.jpg", jpeg(2)), ("k.jpg", jpeg(3)),
                       ("k.txt", b"second")])
    scores = write_scores(tmp_path / "s.csv", [(f"{path}::k", (0.9, 0.5))])
    write_selection(scores, None, Selection((), None), to_shards=tmp_path / "out")
    assert members(tmp_path / "out" / "00000.tar")[:2] == [("k.jpg", jpeg(1)), ("k.txt", b"first")]


def test_one_key_from_two_source_shards_starts_a_new_output_shard(tmp_path):
    """Keys stay unique within a shard, as WebDataset readers need."""
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    write_shard(a, sample("000001", 1))
    write_shard(b, sample("000001", 2))
    scores = write_scores(tmp_path / "s.csv", [(f"{a}::000001", (0.9, 0.5)), (f"{b}::000001", (0.8, 0.5))])
    result = write_selection(scores, None, Selection((), None), to_shards=tmp_path / "out")
    assert result.shards.shards == 2 and members(tmp_path / "out" / "00001.tar")[0] == ("000001.jpg", jpeg(2))


def test_a_scores_member_already_there_is_replaced(tmp_path):
    path = tmp_path / "sel.tar"
    write_shard(path, sample("k", 1, extra=[("k.scores.json", b'{"old": 1}')]))
    scores = write_scores(tmp_path / "s.csv", [(f"{path}::k", (0.7, 0.5))])
    write_selection(scores, None, Selection((), None), to_shards=tmp_path / "out")
    got = [(n, d) for n, d in members(tmp_path / "out" / "00000.tar") if n.endswith("scores.json")]
    assert len(got) == 1 and json.loads(got[0][1])["scores"]["quality"] == 0.7


def test_a_folder_already_holding_shards_is_refused(tmp_path):
    _, scores = scored_shards(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "00000.tar").write_bytes(b"")
    res = select(scores, "--top-k", "1", "--to-shards", tmp_path / "out")
    assert res.exit_code == 1 and "already holds shards" in res.output


def test_a_kept_sample_gone_from_its_shard_is_refused_and_the_run_leaves_nothing(tmp_path):
    (src, other), scores = scored_shards(tmp_path)
    write_shard(other, sample("100000", 1))  # shard 1 rewritten since it was scored: 100001..3 are gone
    res = select(scores, "--min", "quality=0", "--to-shards", tmp_path / "out", "--shard-size", "2")
    assert res.exit_code == 1 and "3 kept sample(s) not found in the shard (first:" in res.output
    assert "changed since it was scored" in res.output and not list((tmp_path / "out").iterdir())  # 00000.tar removed


def test_a_source_shard_cut_inside_a_kept_sample_is_refused(tmp_path):
    path = tmp_path / "cut.tar"
    full = write_shard(path, sample("a", 1) + sample("b", 2))
    with tarfile.open(path) as tf:
        b_image = next(m for m in tf.getmembers() if m.name == "b.jpg")
    path.write_bytes(full[:b_image.offset_data + 100])  # cut inside b's image, after it was scored
    scores = write_scores(tmp_path / "s.csv", [(f"{path}::b", (0.9, 0.5))])
    res = select(scores, "--top-k", "1", "--to-shards", tmp_path / "out")
    assert res.exit_code == 1 and f"truncated or corrupt inside {path}::b" in res.output
    assert not list((tmp_path / "out").iterdir())


def test_relative_shard_rows_resolve_against_images_root(tmp_path, monkeypatch):
    make_shards(tmp_path / "data" / "shards", 2, 1)
    scores = write_scores(tmp_path / "s.csv", [("shards/00000.tar::000001", (0.9, 0.5))])
    monkeypatch.chdir(tmp_path)
    res = select(scores, "--top-k", "1", "--to-shards", "out")
    assert res.exit_code == 1 and "shards/00000.tar: the shard of" in res.output and "--images-root" in res.output
    res = select(scores, "--top-k", "1", "--to-shards", "out", "--images-root", "data")
    assert res.exit_code == 0, res.output
    assert [n for n, _ in members(tmp_path / "out" / "00000.tar")][0] == "000001.jpg"


def test_a_manifest_and_shards_in_one_pass(tmp_path):
    _, scores = scored_shards(tmp_path)
    res = select(scores, "--top-k", "1", "--per", "all", "-o", tmp_path / "keep.csv", "--to-shards", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "keep.csv").read_text().count("\n") == 2 and "1 samples" in res.output


def test_neither_o_nor_to_shards_is_a_usage_error(tmp_path):
    _, scores = scored_shards(tmp_path)
    res = select(scores, "--top-k", "1")
    assert res.exit_code == 2 and "give -o keep.csv and/or --to-shards DIR" in res.output


def test_a_compressed_source_shard_is_read_as_a_stream(tmp_path):
    path = tmp_path / "c.tar.gz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in sample("k", 3):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    scores = write_scores(tmp_path / "s.csv", [(f"{path}::k", (0.7, 0.5))])
    write_selection(scores, None, Selection((), None), to_shards=tmp_path / "out")
    assert [n for n, _ in members(tmp_path / "out" / "00000.tar")] == ["k.jpg", "k.txt", "k.json", "k.scores.json"]
