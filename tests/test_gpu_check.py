"""The prepared GPU check (issue 31): its dry run on the CPU, its isolation of parts, and its imports, held to
what the GPU image has plus the listed wheels (the image has no registry: a missing import costs a lease)."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from benchmarks.gpu_check import decode, parts
from benchmarks.gpu_check.image import IMAGE_PACKAGES, WHEELS_FILE, normalized, wheels
from benchmarks.gpu_check.layout import ROOT

OURS = {"ipiqa", "benchmarks"}


# Runs the check as ``python -m benchmarks.gpu_check`` does, recording each first import of a module and the module
# whose code asked for it (the first frame outside importlib); failed attempts (optional imports) are marked.
RECORDER = """
import atexit, json, runpy, sys
seen = []
class Recorder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        f = sys._getframe(1)
        while f is not None and f.f_globals.get("__name__", "").startswith("importlib"):
            f = f.f_back
        seen.append((name, f.f_globals.get("__name__", "") if f is not None else ""))
        return None
sys.meta_path.insert(0, Recorder)
record = sys.argv[1]
atexit.register(lambda: open(record, "w").write(json.dumps([(n, by, n in sys.modules) for n, by in seen])))
sys.argv = ["benchmarks.gpu_check", *sys.argv[2:]]
runpy.run_module("benchmarks.gpu_check", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run in a fresh interpreter, every import it makes recorded -> (process, report folder, imports)."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, "-c", RECORDER, str(tmp / "imports.json"), "--dry-run",
                           "--out", str(tmp / "out"), "--workdir", str(tmp / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    imports = json.loads((tmp / "imports.json").read_text()) if (tmp / "imports.json").exists() else []
    return proc, tmp / "out", imports


def test_dry_run_runs_every_part_and_writes_one_summary_line_each(dry_run):
    proc, out, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(next(out.glob("*/gpu_check.json")).read_text())
    assert [p["name"] for p in report["parts"]] == ["parity", "decode", "throughput", "reproducible", "claims",
                                                    "parity-compile"]
    for p in report["parts"]:
        assert p["status"] in ("PASS", "MEASURED"), p["summary"] + (p["error"] or "")
        assert p["bound"] and p["figure"] and p["rows"]
        assert p["summary"] in proc.stdout  # printed at the end of the output
    assert (out / report["machine_name"] / "gpu_check.md").read_text().count("## ") == 7  # summary + 6 parts


def test_dry_run_judges_parity_by_the_gates_bounds_table(dry_run):
    from ipiqa.export.checks import BOUNDS

    report = json.loads(next(dry_run[1].glob("*/gpu_check.json")).read_text())
    parity = {r["check"]: r for r in report["parts"][0]["rows"]}
    assert parity["fp16 (dry run: FP32 on CPU)/feature_map"]["bound"] == BOUNDS["fp16"].cosine_min
    assert {"fp32/feature_map", "fp32/image_embedding", "fp32/text_embedding", "fp32/pooled (relative)",
            "fp32/scores"} <= set(parity)


def test_a_part_that_raises_is_reported_and_the_next_part_still_runs():
    def broken():
        raise RuntimeError("CUDA error: an illegal memory access")

    results = parts.run_parts({"first": broken, "second": lambda: parts.PartResult("x", parts.PASS, "b", "f")})
    assert [r.status for r in results] == [parts.ERROR, parts.PASS]
    assert "illegal memory access" in results[0].figure and "RuntimeError" in results[0].error
    assert results[1].name == "second"


def test_parts_past_the_deadline_are_not_run_and_the_report_follows_each_part():
    seen = []
    results = parts.run_parts({"a": lambda: parts.PartResult("a", parts.PASS, "b", "f"),
                               "b": lambda: parts.PartResult("b", parts.PASS, "b", "f")},
                              deadline_s=0.0, on_result=lambda done: seen.append([r.name for r in done]))
    assert [r.status for r in results] == [parts.NOT_RUN, parts.NOT_RUN] and "deadline" in results[0].figure
    assert seen == [["a"], ["a", "b"]]


def test_odd_jpegs_span_the_issue_s_sizes_and_modes():
    sizes = decode.sizes(200, (4000, 3000))
    assert (1, 700) in sizes and (4000, 3000) in sizes and len(sizes) == 200
    assert sum(w % 8 != 0 or h % 8 != 0 for w, h in sizes) >= 190  # off the JPEG block grid
    modes = {("L" if i % 10 == 3 else "CMYK" if i % 10 == 7 else "RGB") for i in range(200)}
    assert modes == {"RGB", "L", "CMYK"}


def test_a_resize_off_by_one_level_is_not_bit_equal():
    rng = np.random.default_rng(0)
    decoded = rng.integers(0, 256, (3, 7, 5), dtype=np.uint8)
    resized = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    figures = decode.compare_image(decoded, resized + 1, resized, decoded, resized)
    assert figures["decode_equal"] and figures["exact_resize_equal"]
    assert not figures["resize_equal"] and figures["resize_max_levels"] == 1


def test_layout_maps_the_subpackages_where_ipiqa_is_not_installed():
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')];"
            "sys.path[:] = [p for p in sys.path if '__editable__' not in p]; sys.path.insert(0, '.');"
            "from benchmarks.gpu_check.layout import ensure_layout; print(ensure_layout());"
            "import ipiqa.runtime.cpu, ipiqa.export.checks; print(ipiqa.runtime.cpu.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    mapped, path = proc.stdout.splitlines()
    assert "ipiqa.runtime" in mapped and Path(path) == ROOT / "runtime" / "cpu.py"


# ------------------------------------------------------------------------------------------- imports vs the image


def _allowed() -> set[str]:
    return {normalized(n) for n in IMAGE_PACKAGES} | set(wheels())


@lru_cache(maxsize=1)
def _packages() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def _distributions(module: str) -> list[str]:
    return [normalized(d) for d in _packages().get(module, [])]


def _refused(module: str, allowed: set[str]) -> bool:
    """A top-level module the GPU image would not have: not stdlib, not ours, from no allowed distribution."""
    if module in sys.stdlib_module_names or module in OURS:
        return False
    return not set(_distributions(module)) & allowed


def _checked_imports(imports: list) -> set[str]:
    """Top-level modules our code or a carried wheel's code imported (and found: an optional import that failed
    here is one the code does without). The image's own packages bring their own dependencies."""
    carried = {m for m, dists in _packages().items() if set(map(normalized, dists)) & set(wheels())}
    importers = OURS | carried | {"__main__"}
    return {name.split(".")[0] for name, by, found in imports if found and by.split(".")[0] in importers}


def _static_imports() -> set[str]:
    """Absolute imports written in the check's own modules (GPU-only branches included) and in the benchmarks
    modules they import."""
    files, seen, names = list((ROOT / "benchmarks" / "gpu_check").glob("*.py")), set(), set()
    while files:
        path = files.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.level == 2 and node.module:  # from ..flops: benchmarks/
                files.append(ROOT / "benchmarks" / f"{node.module.split('.')[0]}.py")
    return names


def test_the_check_imports_only_what_the_gpu_image_has_plus_the_listed_wheels(dry_run):
    allowed = _allowed()
    imported = _checked_imports(dry_run[2]) | _static_imports()
    assert {"torch", "open_clip", "ftfy", "PIL", "onnx"} <= imported  # the hook saw the imports that matter
    assert sorted(m for m in imported if _refused(m, allowed)) == []


def test_the_wheels_file_pins_each_wheel_and_holds_its_fetch_command():
    pinned = wheels()
    assert set(pinned) == {"open-clip-torch", "ftfy", "wcwidth"}
    assert "pip download --no-deps" in WHEELS_FILE.read_text() and "-r benchmarks/gpu_wheels.txt" in WHEELS_FILE.read_text()
