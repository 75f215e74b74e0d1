"""Scoring on a local Ray cluster: every row exactly once, same scores as the runtime, an actor death survived."""
from __future__ import annotations

import csv

import pytest
from click.testing import CliRunner

from conftest import make_image, same_model_tolerance
from test_shards import outputs
from ipiqa.cli import EXIT_ROW_ERRORS, cli
from ipiqa.runtime.io import Row
from ipiqa.runtime.scorer import Scorer

ray = pytest.importorskip("ray", reason="needs ipiqa[ray]")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rows = [Row(str(make_image(d / f"i{i:02d}.png", seed=i)), f"prompt {i % 4}") for i in range(30)]
    (d / "bad.jpg").write_bytes(b"not a jpeg")
    return rows[:10] + [Row(str(d / "bad.jpg"), "x"), Row(str(d / "i00.png"), None)] + rows[10:]


def _read(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_every_row_exactly_once_with_the_runtime_scores_despite_an_actor_death(cluster, bundle, tiny_model_file, rows,
                                                                                  tmp_path, monkeypatch):
    from ipiqa.runtime.distributed import FAIL_ONCE_ENV, score_with_ray

    marker = tmp_path / "died"
    monkeypatch.setenv(FAIL_ONCE_ENV, str(marker))  # reaches the actors through their runtime_env
    summary = score_with_ray(bundle, rows, tmp_path / "ray.csv", batch_size=4, device="cpu")
    assert marker.exists()  # an actor really was killed mid-run
    with Scorer(bundle, device="cpu") as scorer:
        scorer.score_files(rows, tmp_path / "local.csv", batch_size=4)
    got, want = _read(tmp_path / "ray.csv"), _read(tmp_path / "local.csv")
    assert [r["image"] for r in got] == [r.image for r in rows] and summary.rows == len(rows) == 32
    assert summary.errors == 2 and "not a readable image" in got[10]["error"] and "missing prompt" in got[11]["error"]
    scored = [r for r in want if not r["error"]]  # the bundle is tiny_model_file's: two evaluations of one model
    tolerance = same_model_tolerance(tiny_model_file, [r["image"] for r in scored], [r["prompt"] for r in scored])
    for a, b in zip(got, want):
        assert a["error"] == b["error"]
        if not a["error"]:
            assert abs(float(a["quality"]) - float(b["quality"])) <= tolerance


def test_parquet_output_holds_every_row(cluster, bundle, rows, tmp_path):
    import pyarrow.parquet as pq

    from ipiqa.runtime.distributed import score_with_ray

    score_with_ray(bundle, rows, tmp_path / "out.parquet", batch_size=8, device="cpu")
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column("image").to_pylist() == [r.image for r in rows]  # every row once, in input order
    assert {"image", "prompt", "quality", "alignment", "error"} <= set(table.column_names)


def test_cli_ray_flag_scores_a_manifest(cluster, bundle, rows, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,prompt\n" + "".join(f"{r.image},{r.prompt or ''}\n" for r in rows[:12]))
    res = CliRunner().invoke(cli, ["score", str(bundle), "--images", str(manifest), "-o", str(tmp_path / "o.csv"),
                                   "--ray", "--device", "cpu"])
    assert res.exit_code == EXIT_ROW_ERRORS, res.output
    assert len(_read(tmp_path / "o.csv")) == 12


def test_ray_gives_the_same_row_as_the_api_for_every_bad_input(cluster, bundle, tiny_model_file, tmp_path):
    """FIFO, /dev/zero, missing file, missing prompt, the word NaN, corrupt bytes: one rule, every entry point."""
    import os

    from ipiqa.runtime.distributed import score_with_ray

    image = make_image(tmp_path / "ok.png", seed=3)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really")
    rows = [Row(str(fifo), "a"), Row("/dev/zero", "a"), Row(str(tmp_path / "missing.png"), "a"),
            Row(str(image), None), Row(str(image), "NaN"), Row(str(tmp_path / "corrupt.jpg"), "a")]
    score_with_ray(bundle, rows, tmp_path / "ray.csv", batch_size=4, device="cpu")
    with Scorer(bundle, device="cpu") as scorer:
        api = scorer.score([r.image for r in rows], [r.prompt for r in rows])
    got = _read(tmp_path / "ray.csv")
    assert [r["error"] for r in got] == [a["error"] or "" for a in api]
    tolerance = same_model_tolerance(tiny_model_file, [rows[4].image], [rows[4].prompt])
    assert got[4]["error"] == "" and abs(float(got[4]["quality"]) - api[4]["quality"]) <= tolerance


# ---------------------------------------------------------------- shards and Parquet on Ray (issue 21)


def _shards(d):
    from test_shards import good_samples, jpeg, write_shard

    write_shard(d / "00000.tar", good_samples(0, 5) + [("bad.jpg", b"not a jpeg"), ("bad.txt", b"x"),
                                                       ("nop.jpg", jpeg(60)), ("000001.jpg", jpeg(61))])
    full = write_shard(d / "full.tar", good_samples(5, 6))
    (d / "00001.tar").write_bytes(full[:len(full) // 2])  # cut mid-shard
    (d / "full.tar").unlink()
    return d


def _loose(tmp_path, data: bytes, label: str):
    path = tmp_path / "loose" / (label.replace("/", "_").replace(":", "_") + ".img")
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


def test_per_shard_outputs_on_ray_equal_the_local_ones_despite_an_actor_death(cluster, bundle, tiny_model_file,
                                                                              tmp_path, monkeypatch):
    from ipiqa.runtime.distributed import FAIL_ONCE_ENV, score_with_ray
    from ipiqa.runtime.io import RowSource
    from ipiqa.runtime.io.partitions import score_partitions
    from test_shards import jpeg

    d = tmp_path / "in"
    d.mkdir()
    source = RowSource(_shards(d))
    with Scorer(bundle, device="cpu") as scorer:
        local = score_partitions(scorer, source, tmp_path / "local", batch_size=2)
    marker = tmp_path / "died"
    monkeypatch.setenv(FAIL_ONCE_ENV, str(marker))  # the first actor dies after writing its first batch
    summary = score_with_ray(bundle, source, tmp_path / "ray", batch_size=2, device="cpu", per_partition=True)
    assert marker.exists() and (summary.scored, summary.rows, summary.errors) == (2, local.rows, local.errors)
    assert outputs(tmp_path / "ray") == ["00000.csv", "00001.csv"]  # no partial left
    for name in ("00000.csv", "00001.csv"):
        got, want = _read(tmp_path / "ray" / name), _read(tmp_path / "local" / name)
        assert [(r["image"], r["error"]) for r in got] == [(r["image"], r["error"]) for r in want]
        scored = [r for r in want if not r["error"]]  # the same images as files give the bound (conftest)
        files = [_loose(tmp_path, jpeg(int(r["image"].rsplit("::", 1)[1])), r["image"]) for r in scored]
        tolerance = same_model_tolerance(tiny_model_file, files, [r["prompt"] for r in scored])
        for a, b in zip(got, want):
            if not a["error"]:
                assert abs(float(a["quality"]) - float(b["quality"])) <= tolerance
    errors = [r["error"] for r in _read(tmp_path / "ray" / "00000.csv")]
    assert "not a readable image" in errors[5] and "missing prompt" in errors[6] and "duplicate key" in errors[7]
    assert "truncated or corrupt" in _read(tmp_path / "ray" / "00001.csv")[-1]["error"]


def test_cli_ray_scores_parquet_bytes_into_one_output_with_the_local_rows(cluster, bundle, tiny_model_file, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from test_parquet_source import png

    cells = [png(i) for i in range(5)] + [b"broken", None]
    pq.write_table(pa.table({"image": pa.array(cells, pa.binary()), "prompt": ["a", "b", None, "c", "d", "e", "f"]}),
                   tmp_path / "d.parquet", row_group_size=3)
    args = ["score", str(bundle), "--images", str(tmp_path / "d.parquet"), "--device", "cpu", "--batch", "3"]
    res = CliRunner().invoke(cli, args + ["-o", str(tmp_path / "ray.csv"), "--ray"])
    assert res.exit_code == EXIT_ROW_ERRORS, res.output
    assert CliRunner().invoke(cli, args + ["-o", str(tmp_path / "local.csv"), "-q"]).exit_code == EXIT_ROW_ERRORS
    got, want = _read(tmp_path / "ray.csv"), _read(tmp_path / "local.csv")
    assert [(r["image"], r["prompt"], r["error"]) for r in got] == [(r["image"], r["prompt"], r["error"]) for r in want]
    assert [bool(r["error"]) for r in got] == [False, False, True, False, False, True, True]
    scored = [(i, r) for i, r in enumerate(want) if not r["error"]]
    tolerance = same_model_tolerance(tiny_model_file, [_loose(tmp_path, cells[i], r["image"]) for i, r in scored],
                                     [r["prompt"] for _, r in scored])
    for a, b in zip(got, want):
        if not a["error"]:
            assert abs(float(a["quality"]) - float(b["quality"])) <= tolerance


def test_cli_ray_scores_a_manifest_naming_shard_samples_and_parquet_rows_like_a_local_run(cluster, bundle, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from test_parquet_source import png
    from test_shards import good_samples, write_shard

    write_shard(tmp_path / "s.tar", good_samples(0, 4))
    (tmp_path / "loose.png").write_bytes(png(9))
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": png(0), "path": None}, {"bytes": None, "path": "loose.png"}]  # bytes, and a path-only cell
    pq.write_table(pa.table({"image": pa.array(cells, struct)}), tmp_path / "d.parquet")
    (tmp_path / "sel.csv").write_text("image,prompt\ns.tar::000002,x\nd.parquet::1,y\ns.tar::000000,\n"
                                      "d.parquet::0,z\ns.tar::000099,x\n")
    args = ["score", str(bundle), "--images", str(tmp_path / "sel.csv"), "--device", "cpu", "--batch", "2"]
    res = CliRunner().invoke(cli, args + ["-o", str(tmp_path / "ray.csv"), "--ray"])
    assert res.exit_code == EXIT_ROW_ERRORS, res.output
    assert "5 rows of manifest" in res.output
    assert CliRunner().invoke(cli, args + ["-o", str(tmp_path / "local.csv"), "-q"]).exit_code == EXIT_ROW_ERRORS
    got, want = _read(tmp_path / "ray.csv"), _read(tmp_path / "local.csv")
    assert [(r["image"], r["prompt"], r["error"]) for r in got] == [(r["image"], r["prompt"], r["error"]) for r in want]
    assert [bool(r["error"]) for r in got] == [False, False, False, False, True] and "no such sample" in got[4]["error"]
    for a, b in zip(got[:4], want[:4]):
        assert abs(float(a["quality"]) - float(b["quality"])) <= 1e-4
