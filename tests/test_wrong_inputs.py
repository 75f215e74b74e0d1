"""Every wrong input to every command ends in one clear line and exit status 1 or 2, never a traceback.

One table: each row is a command line with one bad value (a file that is missing, a folder, a FIFO or /dev/null
where a file is read, a file that is not what the option takes, malformed text, a number out of range, odd
unicode) and what the error line must name (the option or the file). Every input fails before any model is
exported or trained: the files are tiny and made here.

Commands run in-process through click's CliRunner with ``catch_exceptions=False``: an exception that escapes a
command (a traceback for a user) fails the test instead of becoming an exit code.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import make_image
from ipiqa.cli import cli, score_cmd
from ipiqa.export.cli import main as export_cli

COMMANDS = {"ipiqa": cli, "ipiqa-score": score_cmd, "ipiqa-export": export_cli}
pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_file) -> dict[str, str]:
    """Placeholder -> path. Good inputs (MODEL, IMAGE, DIR, LABELS) so that each case has exactly one bad value."""
    d = tmp_path_factory.mktemp("wrong_inputs")
    make_image(d / "a.png")
    (d / "labels.csv").write_text("image,prompt,score\na.png,a cat,3.0\n", encoding="utf-8")
    (d / "empty_dir").mkdir()
    (d / "bundle_like").mkdir()  # a folder that is not a bundle
    os.mkfifo(d / "fifo")
    files = {
        "bad.json": "not json {",
        "bad.yaml": "epochs: [1\n",
        "tab.yaml": "epochs: 1\n\tlr: 2\n",
        "list.json": "[1, 2]",
        "unknown_key.json": json.dumps({"learning_rate": 1}),
        "bad_type.json": json.dumps({"epochs": "ten"}),
        "bad_arch.json": json.dumps({"arch": {"vision_heads": 0}}),
        "bad_device.yaml": "device: gpu\n",
        "bad_score.csv": "image,prompt,score\na.png,a cat,high\n",
        "no_columns.csv": "",
    }
    for name, text in files.items():
        (d / name).write_text(text, encoding="utf-8")
    (d / "latin1.csv").write_bytes(b"image,prompt,score\na.png,caf\xe9,3.0\n")
    (d / "latin1.json").write_bytes(b'{"device": "caf\xe9"}')
    (d / "AIGC_MOS_Zscore.xlsx").write_bytes(b"not a zip")
    (d / "not_weights.pth").write_bytes(b"\x00" * 64)
    return {"MODEL": str(tiny_model_file), "IMAGE": str(d / "a.png"), "DIR": str(d / "empty_dir"),
            "NOT_BUNDLE": str(d / "bundle_like"), "LABELS": str(d / "labels.csv"), "FIFO": str(d / "fifo"),
            "NULL": os.devnull, "MISSING": str(d / "missing.safetensors"), "OUT": str(d / "out"),
            "ODD": str(d / "\udcff\u00e9\U0001f600.png"), "IMAGES": str(d),
            **{name.upper().replace(".", "_"): str(d / name) for name in
               [*files, "latin1.csv", "latin1.json", "AIGC_MOS_Zscore.xlsx", "not_weights.pth"]}}


# Shared tails: the required options with good values (the bad value is added before them).
FINETUNE = ["train", "finetune", "--dataset", "csv", "--labels", "LABELS", "--images", "IMAGES", "--out", "OUT",
            "--random-init"]
PRETRAIN = ["train", "pretrain", "--pairs", "LABELS", "--images", "IMAGES", "--out", "OUT", "--random-init"]
EVALUATE = ["train", "evaluate", "--dataset", "csv", "--labels", "LABELS", "--images", "IMAGES", "--run", "DIR"]
SCORE = ["score", "MODEL", "--images", "IMAGE", "--prompt", "a cat", "-q"]
EXPORT = ["MODEL", "-o", "OUT", "--onnx-only"]
INT8 = [*EXPORT, "--int8", "--calibration", "IMAGES"]


def replace_opt(args: list[str], option: str, value: str) -> list[str]:
    """``args`` with ``option``'s value replaced (or the option added)."""
    if option in args:
        i = args.index(option)
        return [*args[:i + 1], value, *args[i + 2:]]
    return [*args, option, value]


def arg(args: list[str], index: int, value: str) -> list[str]:
    return [*args[:index], value, *args[index + 1:]]


# (id, command, argv with placeholders, what the error line must name)
CASES = [
    # ipiqa import-official
    ("import-official/finetuned-missing", "ipiqa", ["import-official", "MISSING", "--clip", "MODEL", "-o", "OUT"],
     "missing.safetensors"),
    ("import-official/finetuned-dir", "ipiqa", ["import-official", "DIR", "--clip", "MODEL", "-o", "OUT"], "FINETUNED"),
    ("import-official/finetuned-fifo", "ipiqa", ["import-official", "FIFO", "--clip", "MODEL", "-o", "OUT"], "FIFO"),
    ("import-official/finetuned-devnull", "ipiqa", ["import-official", "NULL", "--clip", "MODEL", "-o", "OUT"],
     "/dev/null"),
    ("import-official/finetuned-not-a-checkpoint", "ipiqa",
     ["import-official", "NOT_WEIGHTS_PTH", "--clip", "MODEL", "-o", "OUT"], "not_weights.pth"),
    ("import-official/clip-dir", "ipiqa", ["import-official", "MODEL", "--clip", "DIR", "-o", "OUT"], "--clip"),
    ("import-official/clip-fifo", "ipiqa", ["import-official", "MODEL", "--clip", "FIFO", "-o", "OUT"], "--clip"),
    ("import-official/output-dir", "ipiqa", ["import-official", "MODEL", "--clip", "MODEL", "-o", "DIR"], "--output"),
    ("import-official/outputs-space", "ipiqa",
     ["import-official", "MODEL", "--clip", "MODEL", "-o", "OUT", "--outputs", "mos score"], "--outputs"),
    ("import-official/outputs-three", "ipiqa",
     ["import-official", "MODEL", "--clip", "MODEL", "-o", "OUT", "--outputs", "a,b,c"], "--outputs"),
    ("import-official/outputs-duplicate", "ipiqa",
     ["import-official", "MODEL", "--clip", "MODEL", "-o", "OUT", "--outputs", "q,q"], "--outputs"),
    ("import-official/outputs-empty", "ipiqa",
     ["import-official", "MODEL", "--clip", "MODEL", "-o", "OUT", "--outputs", ""], "--outputs"),
    ("import-official/outputs-not-utf8", "ipiqa",
     ["import-official", "MODEL", "--clip", "MODEL", "-o", "OUT", "--outputs", "q\udcff"], "--outputs"),
    # ipiqa info
    ("info/missing", "ipiqa", ["info", "MISSING"], "missing.safetensors"),
    ("info/fifo", "ipiqa", ["info", "FIFO"], "FIFO"),
    ("info/devnull", "ipiqa", ["info", "NULL"], "/dev/null"),
    ("info/not-a-model", "ipiqa", ["info", "BAD_JSON"], "bad.json"),
    ("info/folder-not-a-bundle", "ipiqa", ["info", "NOT_BUNDLE"], "manifest.json"),
    ("info/odd-unicode-name", "ipiqa", ["info", "ODD"], "MODEL_OR_BUNDLE"),
    # ipiqa score (ipiqa-score below runs the same command)
    ("score/model-missing", "ipiqa", arg(SCORE, 1, "MISSING"), "missing.safetensors"),
    ("score/model-fifo", "ipiqa", arg(SCORE, 1, "FIFO"), "FIFO"),
    ("score/model-devnull", "ipiqa", arg(SCORE, 1, "NULL"), "/dev/null"),
    ("score/model-not-a-model", "ipiqa", arg(SCORE, 1, "BAD_JSON"), "bad.json"),
    ("score/model-folder-not-a-bundle", "ipiqa", arg(SCORE, 1, "NOT_BUNDLE"), "manifest.json"),
    ("score/images-missing", "ipiqa", replace_opt(SCORE, "--images", "MISSING"), "--images"),
    ("score/images-fifo", "ipiqa", replace_opt(SCORE, "--images", "FIFO"), "--images"),
    ("score/images-devnull", "ipiqa", replace_opt(SCORE, "--images", "NULL"), "--images"),
    ("score/images-not-a-manifest", "ipiqa", replace_opt(SCORE, "--images", "BAD_JSON"), "bad.json"),
    ("score/images-odd-unicode-name", "ipiqa", replace_opt(SCORE, "--images", "ODD"), "--images"),
    ("score/prompt-not-utf8", "ipiqa", replace_opt(SCORE, "--prompt", "a \udcff cat"), "--prompt"),
    ("score/device-cuda-x", "ipiqa", [*SCORE, "--device", "cuda:x"], "--device"),
    ("score/device-gpu", "ipiqa", [*SCORE, "--device", "gpu"], "--device"),
    ("score/batch-0", "ipiqa", [*SCORE, "--batch", "0"], "--batch"),
    ("score/batch-text", "ipiqa", [*SCORE, "--batch", "many"], "--batch"),
    ("score/workers-0", "ipiqa", [*SCORE, "--workers", "0"], "--workers"),
    ("score/output-dir", "ipiqa", [*SCORE, "-o", "DIR"], "--output"),
    ("score/backend-unknown", "ipiqa", [*SCORE, "--backend", "cuda"], "--backend"),
    ("score/precision-unknown", "ipiqa", [*SCORE, "--precision", "fp8"], "--precision"),
    ("score/format-unknown", "ipiqa", [*SCORE, "--format", "xlsx"], "--format"),
    ("ipiqa-score/model-fifo", "ipiqa-score", arg(SCORE[1:], 0, "FIFO"), "FIFO"),
    ("ipiqa-score/batch-0", "ipiqa-score", [*SCORE[1:], "--batch", "0"], "--batch"),
    ("ipiqa-score/device-cuda-x", "ipiqa-score", [*SCORE[1:], "--device", "cuda:x"], "--device"),
    # ipiqa demo
    ("demo/resolution-100", "ipiqa", ["demo", "--out", "OUT", "--resolution", "100"], "--resolution"),
    ("demo/resolution-0", "ipiqa", ["demo", "--out", "OUT", "--resolution", "0"], "--resolution"),
    ("demo/resolution-text", "ipiqa", ["demo", "--out", "OUT", "--resolution", "big"], "--resolution"),
    ("demo/out-is-a-file", "ipiqa", ["demo", "--out", "IMAGE"], "--out"),
    # ipiqa train finetune
    ("finetune/config-missing", "ipiqa", [*FINETUNE, "--config", "MISSING"], "--config"),
    ("finetune/config-dir", "ipiqa", [*FINETUNE, "--config", "DIR"], "--config"),
    ("finetune/config-fifo", "ipiqa", [*FINETUNE, "--config", "FIFO"], "--config"),
    ("finetune/config-devnull", "ipiqa", [*FINETUNE, "--config", "NULL"], "--config"),
    ("finetune/config-not-json", "ipiqa", [*FINETUNE, "--config", "BAD_JSON"], "bad.json"),
    ("finetune/config-not-yaml", "ipiqa", [*FINETUNE, "--config", "BAD_YAML"], "bad.yaml"),
    ("finetune/config-yaml-tab", "ipiqa", [*FINETUNE, "--config", "TAB_YAML"], "tab.yaml"),
    ("finetune/config-not-a-mapping", "ipiqa", [*FINETUNE, "--config", "LIST_JSON"], "list.json"),
    ("finetune/config-unknown-key", "ipiqa", [*FINETUNE, "--config", "UNKNOWN_KEY_JSON"], "learning_rate"),
    ("finetune/config-wrong-type", "ipiqa", [*FINETUNE, "--config", "BAD_TYPE_JSON"], "epochs"),
    ("finetune/config-bad-arch", "ipiqa", [*FINETUNE, "--config", "BAD_ARCH_JSON"], "vision_heads"),
    ("finetune/config-bad-device", "ipiqa", [*FINETUNE, "--config", "BAD_DEVICE_YAML"], "device"),
    ("finetune/config-not-utf8", "ipiqa", [*FINETUNE, "--config", "LATIN1_JSON"], "latin1.json"),
    ("finetune/labels-missing", "ipiqa", replace_opt(FINETUNE, "--labels", "MISSING"), "--labels"),
    ("finetune/labels-fifo", "ipiqa", replace_opt(FINETUNE, "--labels", "FIFO"), "--labels"),
    ("finetune/labels-devnull", "ipiqa", replace_opt(FINETUNE, "--labels", "NULL"), "--labels"),
    ("finetune/labels-no-columns", "ipiqa", replace_opt(FINETUNE, "--labels", "NO_COLUMNS_CSV"), "no_columns.csv"),
    ("finetune/labels-not-utf8", "ipiqa", replace_opt(FINETUNE, "--labels", "LATIN1_CSV"), "latin1.csv"),
    ("finetune/labels-score-not-a-number", "ipiqa", replace_opt(FINETUNE, "--labels", "BAD_SCORE_CSV"),
     "bad_score.csv"),
    ("finetune/labels-xlsx-not-a-workbook", "ipiqa",
     replace_opt(replace_opt(FINETUNE, "--dataset", "agiqa-1k"), "--labels", "AIGC_MOS_ZSCORE_XLSX"),
     "AIGC_MOS_Zscore.xlsx"),
    ("finetune/labels-folder-without-the-file", "ipiqa",
     replace_opt(replace_opt(FINETUNE, "--dataset", "agiqa-3k"), "--labels", "DIR"), "data.csv"),
    ("finetune/dataset-unknown", "ipiqa", replace_opt(FINETUNE, "--dataset", "agiqa-9k"), "agiqa-9k"),
    ("finetune/dataset-not-utf8", "ipiqa", replace_opt(FINETUNE, "--dataset", "agiqa\udcff"), "--dataset"),
    ("finetune/images-is-a-file", "ipiqa", replace_opt(FINETUNE, "--images", "IMAGE"), "--images"),
    ("finetune/out-is-a-file", "ipiqa", replace_opt(FINETUNE, "--out", "IMAGE"), "--out"),
    ("finetune/init-fifo", "ipiqa", [*FINETUNE, "--init", "FIFO"], "--init"),
    ("finetune/init-not-a-model", "ipiqa", [*FINETUNE, "--init", "BAD_JSON"], "bad.json"),
    ("finetune/clip-fifo", "ipiqa", [*FINETUNE, "--clip", "FIFO"], "--clip"),
    ("finetune/epochs-0", "ipiqa", [*FINETUNE, "--epochs", "0"], "--epochs"),
    ("finetune/batch-size-0", "ipiqa", [*FINETUNE, "--batch-size", "0"], "--batch-size"),
    ("finetune/lr-0", "ipiqa", [*FINETUNE, "--lr", "0"], "--lr"),
    ("finetune/lr-text", "ipiqa", [*FINETUNE, "--lr", "fast"], "--lr"),
    ("finetune/lr-nan", "ipiqa", [*FINETUNE, "--lr", "nan"], "--lr"),
    ("finetune/resolution-100", "ipiqa", [*FINETUNE, "--resolution", "100"], "--resolution"),
    ("finetune/workers-negative", "ipiqa", [*FINETUNE, "--workers", "-1"], "--workers"),
    ("finetune/seed-negative", "ipiqa", [*FINETUNE, "--seed", "-1"], "--seed"),
    ("finetune/device-cuda-x", "ipiqa", [*FINETUNE, "--device", "cuda:x"], "--device"),
    ("finetune/splits-0", "ipiqa", [*FINETUNE, "--splits", "0"], "--splits"),
    ("finetune/only-split-out-of-range", "ipiqa", [*FINETUNE, "--only-split", "10"], "--only-split"),
    # ipiqa train pretrain
    ("pretrain/pairs-missing", "ipiqa", replace_opt(PRETRAIN, "--pairs", "MISSING"), "--pairs"),
    ("pretrain/pairs-dir", "ipiqa", replace_opt(PRETRAIN, "--pairs", "DIR"), "--pairs"),
    ("pretrain/pairs-fifo", "ipiqa", replace_opt(PRETRAIN, "--pairs", "FIFO"), "--pairs"),
    ("pretrain/pairs-not-a-manifest", "ipiqa", replace_opt(PRETRAIN, "--pairs", "BAD_JSON"), "bad.json"),
    ("pretrain/min-similarity-2", "ipiqa", [*PRETRAIN, "--min-similarity", "2"], "--min-similarity"),
    ("pretrain/config-not-yaml", "ipiqa", [*PRETRAIN, "--config", "BAD_YAML"], "bad.yaml"),
    ("pretrain/epochs-0", "ipiqa", [*PRETRAIN, "--epochs", "0"], "--epochs"),
    ("pretrain/device-cuda-x", "ipiqa", [*PRETRAIN, "--device", "cuda:x"], "--device"),
    # ipiqa train evaluate
    ("evaluate/labels-fifo", "ipiqa", replace_opt(EVALUATE, "--labels", "FIFO"), "--labels"),
    ("evaluate/labels-not-utf8", "ipiqa", replace_opt(EVALUATE, "--labels", "LATIN1_CSV"), "latin1.csv"),
    ("evaluate/run-missing", "ipiqa", replace_opt(EVALUATE, "--run", "MISSING"), "--run"),
    ("evaluate/run-is-a-file", "ipiqa", replace_opt(EVALUATE, "--run", "IMAGE"), "--run"),
    ("evaluate/run-without-splits", "ipiqa", EVALUATE, "empty_dir"),
    ("evaluate/batch-size-0", "ipiqa", [*EVALUATE, "--batch-size", "0"], "--batch-size"),
    ("evaluate/device-cuda-x", "ipiqa", [*EVALUATE, "--device", "cuda:x"], "--device"),
    ("evaluate/dataset-unknown", "ipiqa", replace_opt(EVALUATE, "--dataset", "agiqa-9k"), "agiqa-9k"),
    # ipiqa-export
    ("export/model-missing", "ipiqa-export", arg(EXPORT, 0, "MISSING"), "[MODEL]"),
    ("export/model-dir", "ipiqa-export", arg(EXPORT, 0, "DIR"), "[MODEL]"),
    ("export/model-fifo", "ipiqa-export", arg(EXPORT, 0, "FIFO"), "[MODEL]"),
    ("export/model-devnull", "ipiqa-export", arg(EXPORT, 0, "NULL"), "[MODEL]"),
    ("export/model-not-a-model", "ipiqa-export", arg(EXPORT, 0, "BAD_JSON"), "bad.json"),
    ("export/model-odd-unicode-name", "ipiqa-export", arg(EXPORT, 0, "ODD"), "[MODEL]"),
    ("export/output-is-a-file", "ipiqa-export", replace_opt(EXPORT, "-o", "IMAGE"), "--output"),
    ("export/no-model", "ipiqa-export", EXPORT[1:], "--official"),
    ("export/official-fifo", "ipiqa-export", ["--official", "FIFO", "--clip", "MODEL", *EXPORT[1:]], "--official"),
    ("export/official-without-clip", "ipiqa-export", ["--official", "MODEL", *EXPORT[1:]], "--clip"),
    ("export/batch-0", "ipiqa-export", [*EXPORT, "--batch", "0,1,2"], "--batch"),
    ("export/batch-text", "ipiqa-export", [*EXPORT, "--batch", "one,two,three"], "--batch"),
    ("export/batch-not-utf8", "ipiqa-export", [*EXPORT, "--batch", "1,\udcff,3"], "--batch"),
    ("export/workspace-0", "ipiqa-export", [*EXPORT[:-1], "--workspace", "0"], "--workspace"),
    ("export/workspace-nan", "ipiqa-export", [*EXPORT[:-1], "--workspace", "nan"], "--workspace"),
    ("export/opset-16", "ipiqa-export", [*EXPORT, "--opset", "16"], "--opset"),
    ("export/atol-nan", "ipiqa-export", [*EXPORT, "--atol", "nan"], "--atol"),
    ("export/rtol-negative", "ipiqa-export", [*EXPORT, "--rtol", "-1"], "--rtol"),
    ("export/triton-is-a-file", "ipiqa-export", [*EXPORT, "--triton", "IMAGE"], "--triton"),
    ("export/triton-backend-unknown", "ipiqa-export", [*EXPORT, "--triton-backend", "tf"], "--triton-backend"),
    ("export/int8-without-calibration", "ipiqa-export", [*EXPORT, "--int8"], "--calibration"),
    ("export/calibration-without-int8", "ipiqa-export", [*EXPORT, "--calibration", "IMAGES"], "--int8"),
    ("export/calibration-fifo", "ipiqa-export", replace_opt(INT8, "--calibration", "FIFO"), "--calibration"),
    ("export/calibration-missing", "ipiqa-export", replace_opt(INT8, "--calibration", "MISSING"), "--calibration"),
    ("export/calibration-size-0", "ipiqa-export", [*INT8, "--calibration-size", "0"], "--calibration-size"),
    ("export/int8-setting-unknown-key", "ipiqa-export", [*INT8, "--int8-setting", "speed=max"], "--int8-setting"),
    ("export/int8-setting-no-equals", "ipiqa-export", [*INT8, "--int8-setting", "percentile"], "--int8-setting"),
    ("export/int8-setting-bad-target", "ipiqa-export", [*INT8, "--int8-setting", "gpu.reduce_range=true"],
     "--int8-setting"),
    ("export/int8-setting-bad-bool", "ipiqa-export", [*INT8, "--int8-setting", "cpu.reduce_range=maybe"],
     "--int8-setting"),
    ("export/int8-setting-bad-value", "ipiqa-export", [*INT8, "--int8-setting", "calibrate_method=median"],
     "--int8-setting"),
    ("export/int8-setting-not-utf8", "ipiqa-export", [*INT8, "--int8-setting", "calibrate_method=\udcff"],
     "--int8-setting"),
]


# Run as a separate process: a command blocked opening the FIFO may hold the GIL (safetensors' open does), so no
# thread of the test could run. The open succeeds only while a reader waits; the reader then sees EOF.
UNBLOCK = "import os, sys, time; time.sleep(float(sys.argv[2])); os.close(os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK))"


def run(command: str, args: list[str], fifo: str, timeout: float = 60):
    """The command in-process. One still reading the FIFO after ``timeout`` seconds is unblocked by a watchdog
    process opening the FIFO's other end, and fails the test as a hang."""
    if fifo not in args:
        return CliRunner().invoke(COMMANDS[command], args, prog_name=command, catch_exceptions=False)
    watchdog = subprocess.Popen([sys.executable, "-c", UNBLOCK, fifo, str(timeout)], stderr=subprocess.DEVNULL)
    start = time.monotonic()
    try:
        result = CliRunner().invoke(COMMANDS[command], args, prog_name=command, catch_exceptions=False)
    finally:
        seconds = time.monotonic() - start
        watchdog.kill()
        watchdog.wait()
    assert seconds < timeout, f"{command} {' '.join(args)}: blocked reading the FIFO for {timeout}s"
    return result


def assert_one_error_line(result, names: str) -> None:
    """Exit 1 (a failure the command reports) or 2 (a usage error); the output is one ``Error:`` line, after
    click's ``Usage:`` and ``Try ...`` lines for usage errors; the line names the option or file."""
    out = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), out
    assert result.exit_code in (1, 2), f"exit {result.exit_code}:\n{out}"
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, f"expected one error line:\n{out}"
    others = [line for line in lines if line not in errors]
    if result.exit_code == 2:
        assert all(line.startswith(("Usage: ", "Try ")) for line in others), out
    else:
        assert not others, f"expected only the error line:\n{out}"
    assert names in errors[0], f"the error line does not name {names!r}:\n{out}"


@pytest.mark.parametrize("command, args, names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_wrong_input_ends_in_one_line(inputs, command, args, names):
    result = run(command, [inputs.get(a, a) for a in args], inputs["FIFO"])
    assert_one_error_line(result, inputs.get(names, names))


def test_the_table_has_one_id_per_case():
    assert len({c[0] for c in CASES}) == len(CASES)


# -- ipiqa-export on a base install (no torch): --help, option errors and the pip line

@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory) -> dict:
    """Environment for a subprocess in which torch/open_clip cannot be imported (tests/test_cli.py's sitecustomize)."""
    from test_cli import HIDE_TORCH

    site = tmp_path_factory.mktemp("hide_torch")
    (site / "sitecustomize.py").write_text(HIDE_TORCH)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def export_without_torch(env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ipiqa.export.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=120)


def test_export_help_works_without_torch(no_torch_env):
    proc = export_without_torch(no_torch_env, "--help")
    assert proc.returncode == 0 and "--onnx-only" in proc.stdout, proc.stderr


@pytest.mark.parametrize("extra, rc, names", [
    ([], 1, "pip install 'ipiqa[export]'"),
    (["--int8", "--calibration", "DIR", "--int8-setting", "calibrate_method=percentile"], 1,
     "pip install 'ipiqa[export]'"),
    (["--batch", "0,1,2"], 2, "--batch"),
    (["--atol", "nan"], 2, "--atol"),
], ids=["needs-torch", "int8-setting-needs-torch", "batch-0", "atol-nan"])
def test_export_without_torch_ends_in_one_line(no_torch_env, inputs, extra, rc, names):
    proc = export_without_torch(no_torch_env, inputs["MODEL"], "-o", inputs["OUT"], "--onnx-only",
                                *[inputs.get(a, a) for a in extra])
    assert proc.returncode == rc, proc.stderr
    assert "Traceback" not in proc.stderr and names in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and (rc == 2 or len(proc.stderr.strip().splitlines()) == 1), proc.stderr
    assert not Path(inputs["OUT"]).exists()


def test_export_options_import_without_torch(no_torch_env):
    """The options, report and errors of an export import on a base install; torch loads when an export runs."""
    code = ("import sys; import ipiqa.export.options as b; b.ExportOptions(onnx_only=True, opset=18); "
            "b.ParityGateError; assert 'torch' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=no_torch_env, timeout=120)
    assert proc.returncode == 0, proc.stderr
