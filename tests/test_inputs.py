"""Input discovery (``runtime.io.inputs``): brace patterns by braceexpand's rules, what a folder holds, and
manifest cells that reference a shard sample or a Parquet row."""
from __future__ import annotations

import pytest

from ipiqa.errors import IPIQAError
from ipiqa.runtime.io import RowSource
from ipiqa.runtime.io.inputs import discover, expand_braces, split_reference


@pytest.mark.parametrize("pattern, names", [
    ("d/{00008..00011}.tar", ["d/00008.tar", "d/00009.tar", "d/00010.tar", "d/00011.tar"]),
    ("{b,a}/{1..2}.tar", ["b/1.tar", "b/2.tar", "a/1.tar", "a/2.tar"]),
    ("x{a,{b,c}}y", ["xay", "xby", "xcy"]),
    ("{a..e}", ["a", "b", "c", "d", "e"]),
    ("{e..c}", ["e", "d", "c"]),
    ("{3..1}", ["3", "2", "1"]),
    ("{0..10..5}", ["0", "5", "10"]),
    ("{a..e..2}", ["a", "c", "e"]),
    ("{8..10}", ["8", "9", "10"]),
    ("{08..10}", ["08", "09", "10"]),
    ("{1..010}", ["001", "002", "003", "004", "005", "006", "007", "008", "009", "010"]),
    ("{-01..1}", ["-01", "000", "001"]),
    ("{,x}a", ["a", "xa"]),
    ("{x}", ["{x}"]),
    ("{{a,b}}", ["{a}", "{b}"]),
    ("a{b", ["a{b"]),
    ("\\{a,b\\}", ["{a,b}"]),
    ("{a\\,b,c}", ["a,b", "c"]),
    ("{a,b}{1,2}", ["a1", "a2", "b1", "b2"]),
    ("plain.tar", ["plain.tar"]),
])
def test_brace_patterns_expand_as_braceexpand_does(pattern, names):
    assert expand_braces(pattern) == names


def test_a_folder_mixing_shards_and_loose_images_is_refused_naming_one_of_each(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"")
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(IPIQAError, match=r"00000\.tar.*a\.jpg"):
        RowSource(tmp_path)


def test_a_folder_mixing_parquet_files_and_loose_images_is_refused(tmp_path):
    (tmp_path / "part-0.parquet").write_bytes(b"")
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(IPIQAError, match=r"Parquet files \(part-0\.parquet.*a\.png"):
        discover(str(tmp_path))


def test_a_folder_of_images_is_counted_while_it_is_listed(tmp_path):
    for n in range(3):
        (tmp_path / f"{n}.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    found = discover(str(tmp_path))
    assert found.kind == "folder" and found.images == 3


@pytest.mark.parametrize("cell, ref", [
    ("shards/00000.tar::000017", ("shards/00000.tar", "000017")),
    ("d/x.TAR.GZ::a/b", ("d/x.TAR.GZ", "a/b")),
    ("data/train.parquet::42", ("data/train.parquet", "42")),
    ("a.tar::k::z", ("a.tar", "k::z")),
    ("photo.jpg", None),
    ("notes.txt::3", None),
])
def test_a_manifest_cell_naming_a_shard_sample_or_a_parquet_row_is_a_reference(cell, ref):
    got = split_reference(cell)
    assert (None if got is None else (str(got[0]), got[1])) == ref


def test_a_file_whose_whole_name_exists_is_not_a_reference(tmp_path):
    odd = tmp_path / "a.tar::b.jpg"
    odd.write_bytes(b"")
    assert split_reference(str(odd)) is None
