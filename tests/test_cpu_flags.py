"""One source of CPU flags that tests can set: every branch that reads flags runs as each CPU family, here.

``$IPIQA_CPU_FLAGS`` replaces the kernel's list; the ``cpu_family`` fixture (conftest) runs a test once per family:
an AMX Xeon, AMD Zen 4, Intel Ice Lake and an AVX2-only CPU. What each family gets is written out below, not
re-derived from the rule under test.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import CPU_FAMILIES
from ipiqa.errors import IPIQAError
from ipiqa.runtime import cpu

HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAVE_OPENVINO, reason="the OpenVINO branches need ipiqa[openvino]")
FAMILY_IDS = [f.name for f in CPU_FAMILIES]


def test_injected_flags_replace_the_kernels_list_and_leave_the_hardware_list_alone(monkeypatch):
    real = cpu.hardware_flags()
    monkeypatch.setenv(cpu.FLAGS_ENV, "avx2, avx512f  avx512_vnni")
    assert cpu.cpu_flags() == {"avx2", "avx512f", "avx512_vnni"} == cpu.injected_flags()
    assert cpu.hardware_flags() == real
    monkeypatch.setenv(cpu.FLAGS_ENV, " ")
    assert cpu.injected_flags() is None and cpu.cpu_flags() == real  # empty: this CPU's own
    monkeypatch.delenv(cpu.FLAGS_ENV)
    assert cpu.cpu_flags() == real


def test_a_malformed_flag_list_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv(cpu.FLAGS_ENV, "avx2;AVX512F")
    with pytest.raises(IPIQAError, match=r"\$IPIQA_CPU_FLAGS: 'avx2;AVX512F' is not a CPU flag name"):
        cpu.cpu_flags()


def test_child_processes_decide_with_the_injected_flags(cpu_family):
    code = "import json; from ipiqa.runtime import cpu; print(json.dumps(sorted(cpu.cpu_flags())))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == sorted(cpu_family.flags)


def test_bf16_is_refused_exactly_on_the_families_without_it_and_the_refusal_says_the_flags_were_set(cpu_family):
    reason = cpu.bf16_refusal()
    if cpu_family.bf16:
        assert reason is None
    else:
        assert "neither AMX (amx_bf16) nor AVX512-BF16 (avx512_bf16)" in reason
        assert "flags set by $IPIQA_CPU_FLAGS" in reason and cpu.cpu_model() in reason


@needs_openvino
def test_export_bf16_is_refused_before_any_work_exactly_on_the_families_without_it(cpu_family):
    from ipiqa.export.options import check_bf16_gating

    if cpu_family.bf16:
        check_bf16_gating()  # the CPU is no reason to refuse
    else:
        with pytest.raises(IPIQAError, match=r"--bf16: this CPU .* has neither AMX"):
            check_bf16_gating()


# The bundle's gate records -> what ``--precision auto`` serves on each family (amx-xeon, zen4, icelake, avx2).
# Measured reasons in cpu_auto_choice's docstring: BF16 first on AMX, INT8 first elsewhere, OpenVINO's INT8 only
# with int8 dot products (VNNI/AMX) and its own gate record.
OV, ORT = "openvino", "onnxruntime"
GATES = {  # name -> (the bundle's gated precisions, whether its INT8 graph passed the OpenVINO gate[, reduce_range])
    "bf16 + int8, openvino int8 gated": (("fp32", "bf16", "int8"), True),
    "bf16 + int8, openvino int8 not gated": (("fp32", "bf16", "int8"), False),
    "bf16 only": (("fp32", "bf16"), False),
    "int8, openvino int8 gated": (("fp32", "int8"), True),
    "fp32 only": (("fp32",), False),
    "int8 with full-range weights, openvino int8 gated": (("fp32", "int8"), True, False),
}
AUTO_TABLE = {
    "bf16 + int8, openvino int8 gated": [(OV, "bf16"), (OV, "int8"), (OV, "int8"), (ORT, "int8")],
    "bf16 + int8, openvino int8 not gated": [(OV, "bf16"), (ORT, "int8"), (ORT, "int8"), (ORT, "int8")],
    "bf16 only": [(OV, "bf16"), (OV, "bf16"), (ORT, "fp32"), (ORT, "fp32")],
    "int8, openvino int8 gated": [(OV, "int8"), (OV, "int8"), (OV, "int8"), (ORT, "int8")],
    "fp32 only": [(ORT, "fp32")] * 4,
    # full-range 8-bit weights overflow 16-bit sums without INT8 dot products (runtime/int8_serving.py)
    "int8 with full-range weights, openvino int8 gated": [(OV, "int8"), (OV, "int8"), (OV, "int8"), (ORT, "fp32")],
}


def _manifest(gates: str) -> SimpleNamespace:
    precisions, openvino_passed, *reduce_range = GATES[gates]
    int8 = {"cpu": SimpleNamespace(openvino_passed=openvino_passed, file="int8/image_encoder.cpu.onnx",
                                   settings={"reduce_range": reduce_range[0] if reduce_range else True})
            } if "int8" in precisions else {}
    return SimpleNamespace(onnx_precisions=precisions, onnx=SimpleNamespace(int8=int8))


@needs_openvino
@pytest.mark.parametrize("gates", list(AUTO_TABLE))
def test_auto_on_cpu_serves_the_fastest_gated_choice_each_family_allows(gates, cpu_family):
    from ipiqa.runtime.scorer import cpu_auto_choice

    expected = AUTO_TABLE[gates][FAMILY_IDS.index(cpu_family.name)]
    assert cpu_auto_choice(_manifest(gates)) == expected


def test_without_openvino_auto_serves_onnxruntime_on_every_family(cpu_family, monkeypatch):
    from ipiqa.runtime import scorer

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert scorer.cpu_auto_choice(_manifest("bf16 + int8, openvino int8 gated")) == (ORT, "int8")
    assert scorer.cpu_auto_choice(_manifest("bf16 only")) == (ORT, "fp32")


@needs_openvino
def test_the_benchmarks_bf16_row_runs_or_says_why_not_in_the_tables_wording_on_every_family(cpu_family):
    from benchmarks.__main__ import NOT_AVAILABLE, _bf16_available

    note = _bf16_available()
    if cpu_family.bf16:
        assert note is None
    else:
        assert note.startswith(NOT_AVAILABLE) and "no BF16 on this CPU" in note and "amx_bf16" in note


def test_the_benchmarks_machine_record_says_when_the_flags_were_injected(cpu_family, monkeypatch):
    from benchmarks.machine import machine_info
    from benchmarks.report import markdown

    info = machine_info()
    assert set(info["cpu_flags"]) <= cpu_family.flags and "avx2" in info["cpu_flags"]
    assert info["cpu_flags_injected_by"] == "IPIQA_CPU_FLAGS"
    assert set(info["hardware_cpu_flags"]) <= cpu.hardware_flags()
    results = {"machine": info, "slug": "s", "resolution": 224, "images_per_prompt": 10, "timestamp": "t"}
    assert "were set by $IPIQA_CPU_FLAGS" in markdown(results)
    monkeypatch.delenv(cpu.FLAGS_ENV)
    assert "cpu_flags_injected_by" not in machine_info()


# ---------------------------------------------------------------- thread pools: the process's cores, none spinning


@pytest.fixture
def two_of_64_cores(monkeypatch):
    """A container limited to 2 CPUs of a 64-core host: the affinity says 2, ``os.cpu_count`` 64."""
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)


def test_onnxruntime_sessions_take_the_process_cores_served_and_in_the_gates(tiny_bundle, two_of_64_cores):
    from ipiqa.bundle import read_bundle
    from ipiqa.export.graph_runs import graph_backend, graph_session
    from ipiqa.runtime.backends.ort import OrtBackend

    m = read_bundle(tiny_bundle)
    graphs = {name: m.graph_path(name) for name in m.onnx.graphs}
    with OrtBackend(m) as served, graph_backend(graphs) as gate:
        for backend in (served, gate):
            assert {s.get_session_options().intra_op_num_threads for s in backend.sessions.values()} == {2}
    assert graph_session(graphs["fusion"]).get_session_options().intra_op_num_threads == 2


@needs_openvino
def test_openvino_compiles_for_the_process_cores(tiny_bundle, monkeypatch):
    """One core of 64 (OpenVINO caps a larger count at the cores it finds, so 1 is what shows the count asked)."""
    import os

    from ipiqa.bundle import read_bundle
    from ipiqa.runtime.backends.openvino import OpenVinoBackend

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    with OpenVinoBackend(read_bundle(tiny_bundle), "fp32", cache_dir="") as ov:
        assert {int(c.get_property("INFERENCE_NUM_THREADS")) for c in ov.models.values()} == {1}


def test_the_export_runs_torch_on_the_process_cores(tiny_model_file, tmp_path, two_of_64_cores, monkeypatch):
    import torch
    from click.testing import CliRunner

    import ipiqa.export.bundle_export as bundle_export
    from ipiqa.export.cli import main

    seen = []
    before = torch.get_num_threads()

    def stop(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise IPIQAError("stopped here")

    monkeypatch.setattr(bundle_export, "export_bundle", stop)
    try:
        res = CliRunner().invoke(main, [str(tiny_model_file), "-o", str(tmp_path / "b"), "--onnx-only"])
    finally:
        torch.set_num_threads(before)
    assert "stopped here" in res.output and seen == [2]


def test_no_onnxruntime_pool_spins_after_its_call_so_the_next_session_gets_the_cores(tiny_bundle):
    """Three sessions called in turn: a pool spin-waiting after its call would hold the next one's cores."""
    from ipiqa.bundle import read_bundle
    from ipiqa.export.graph_runs import graph_backend
    from ipiqa.runtime.backends.ort import OrtBackend

    m = read_bundle(tiny_bundle)
    with OrtBackend(m) as served, graph_backend({name: m.graph_path(name) for name in m.onnx.graphs}) as gate:
        for backend in (served, gate):
            assert {s.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
                    for s in backend.sessions.values()} == {"0"}


def test_int8_dot_products_are_read_from_the_flags_each_family_has(cpu_family):
    from ipiqa.runtime.cpu import int8_dot_flags, int8_weights_refusal

    dot = {"amx-xeon": ("amx_int8", "avx512_vnni"), "zen4": ("avx512_vnni",), "icelake": ("avx512_vnni",), "avx2": ()}
    assert int8_dot_flags() == dot[cpu_family.name]
    assert int8_weights_refusal(True, "g.onnx") is None  # 7-bit weights: every family
    assert (int8_weights_refusal(False, "g.onnx") is None) == bool(dot[cpu_family.name])


def test_the_cpu_signature_is_the_x86_family_and_model_and_empty_where_unknown(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                    "model name\t: AMD EPYC\n\nprocessor\t: 1\ncpu family\t: 25\nmodel\t\t: 17\n")
    monkeypatch.setattr(cpu, "_CPUINFO", info)
    cpu._cpuinfo.cache_clear()
    try:
        assert cpu.cpu_signature() == "family 26 model 2"  # the first processor's
        info.write_text("processor\t: 0\nmodel name\t: some ARM core\n")
        cpu._cpuinfo.cache_clear()
        assert cpu.cpu_signature() == ""
    finally:
        monkeypatch.undo()
        cpu._cpuinfo.cache_clear()


def test_the_benchmark_header_names_the_cpu_signature_beside_the_cores():
    from benchmarks.report import markdown

    results = {"slug": "cpu-2core", "resolution": 512, "timestamp": "t", "runs": [], "images_per_prompt": [10],
               "machine": {"cpu": "AMD EPYC", "cpu_signature": "family 26 model 2", "cores": 2, "gpu": {}}}
    assert "CPU: AMD EPYC (family 26 model 2, 2 cores)" in markdown(results)
    del results["machine"]["cpu_signature"]  # a record written before the signature
    assert "CPU: AMD EPYC (2 cores)" in markdown(results)
