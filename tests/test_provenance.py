"""The run record (runtime/io/provenance.py) on its own: what a resume must share, what it may change (machine,
version: recorded with the row it started at), a server that says only its bundle, folders of per-shard files,
and a damaged record as one line."""
from __future__ import annotations

from dataclasses import replace

import pytest

from ipiqa.errors import IPIQAError
from ipiqa.runtime.io.provenance import (Provenance, check_resume, read_provenance, read_runs, sidecar_path,
                                         write_provenance)

LOCAL = Provenance("a" * 64, "onnxruntime-cpu", "fp32", 1, "0.1.0", "AMD EPYC")


@pytest.fixture
def scored(tmp_path):
    out = tmp_path / "s.csv"
    out.write_text("image,prompt,quality,error\nx.png,p,1.0,\n")
    write_provenance(out, LOCAL, 0)
    return out


@pytest.mark.parametrize("field,value", [("bundle_sha256", "b" * 64), ("backend", "openvino-cpu"),
                                         ("precision", "int8"), ("engine_batch", None)])
def test_a_resume_that_would_score_other_bits_is_refused_naming_both_values(scored, field, value):
    with pytest.raises(IPIQAError) as refused:
        check_resume(scored, replace(LOCAL, **{field: value}))
    message = str(refused.value)
    assert f"scored with {field} {getattr(LOCAL, field)}" in message and f"this run has {field} {value}" in message
    assert str(sidecar_path(scored)) in message


def test_a_resume_on_another_machine_is_allowed_and_recorded_from_its_first_row(scored):
    elsewhere = replace(LOCAL, machine="Intel Xeon", ipiqa_version="0.2.0")
    check_resume(scored, elsewhere)
    write_provenance(scored, elsewhere, 1)
    assert read_runs(scored) == [(0, LOCAL), (1, elsewhere)] and read_provenance(scored) == LOCAL
    write_provenance(scored, elsewhere, 5)  # the same run continued again: nothing new
    assert len(read_runs(scored)) == 2


def test_a_server_that_says_only_its_bundle_is_compared_by_the_bundle(scored):
    check_resume(scored, Provenance.served("host:8001", bundle_sha256=LOCAL.bundle_sha256))
    with pytest.raises(IPIQAError, match="bundle_sha256"):
        check_resume(scored, Provenance.served("host:8001", bundle_sha256="c" * 64))
    assert Provenance.served("host:8001", LOCAL.to_json()) == LOCAL  # a server publishing its own record


def test_a_folder_of_per_shard_files_from_different_runs_is_named(tmp_path):
    for name, record in (("00000.csv", LOCAL), ("00001.csv", replace(LOCAL, backend="openvino-cpu"))):
        (tmp_path / name).write_text("image,prompt,quality,error\n")
        write_provenance(tmp_path / name, record, 0)
    with pytest.raises(IPIQAError, match=r"come from different runs .*00000\.csv\.run\.json vs .*00001\.csv\.run\.json: "
                                         r"backend onnxruntime-cpu vs openvino-cpu"):
        read_provenance(tmp_path)


def test_a_damaged_record_is_one_line_naming_it(scored):
    sidecar_path(scored).write_text('{"runs": [{"backend": ')
    with pytest.raises(IPIQAError, match=r"s\.csv\.run\.json: not an ipiqa run record \(cut or edited\)"):
        read_provenance(scored)
