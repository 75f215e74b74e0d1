"""The ipiqa command line, end to end: every input row gets an output row; failures are one clear line."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import fp32_rule_tolerance, make_image, same_model_tolerance
from ipiqa.checkpoint import read_config
from ipiqa.cli import EXIT_ROW_ERRORS, cli
from ipiqa.training.data import DATASETS


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(5):
        make_image(d / f"img{i}.png", seed=i)
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (d / "notes.txt").write_text("ignored: not an image suffix")
    return d


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_score_folder_with_one_corrupt_file_writes_every_other_row(tiny_model_file, folder, tmp_path):
    out = tmp_path / "scores.csv"
    res = run("score", tiny_model_file, "--images", folder, "--prompt", "a cat", "-o", out, "--batch", "2", "-q")
    assert res.exit_code == EXIT_ROW_ERRORS
    rows = _read_csv(out)
    assert [Path(r["image"]).name for r in rows] == sorted(p.name for p in folder.iterdir() if p.suffix != ".txt")
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and "corrupt.jpg" in bad[0]["error"] and bad[0]["quality"] == ""
    assert all(float(r["quality"]) == float(r["quality"]) and r["alignment"] for r in rows if not r["error"])


def test_allow_errors_exits_zero(tiny_model_file, folder, tmp_path):
    res = run("score", tiny_model_file, "--images", folder, "--prompt", "a cat", "-o", tmp_path / "s.csv",
              "--allow-errors", "-q")
    assert res.exit_code == 0


def test_scores_do_not_depend_on_batch_size(tiny_model_file, folder, tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    run("score", tiny_model_file, "--images", folder, "--prompt", "x", "-o", a, "--batch", "1", "-q")
    run("score", tiny_model_file, "--images", folder, "--prompt", "x", "-o", b, "--batch", "4", "-q")
    scored = [r for r in _read_csv(a) if not r["error"]]
    tolerance = same_model_tolerance(tiny_model_file, [r["image"] for r in scored], [r["prompt"] for r in scored])
    for ra, rb in zip(_read_csv(a), _read_csv(b)):
        assert ra["quality"] == rb["quality"] or abs(float(ra["quality"]) - float(rb["quality"])) <= tolerance


def test_manifest_with_bom_relative_paths_and_missing_prompt(tiny_model_file, folder, tmp_path):
    manifest = folder / "list.csv"
    manifest.write_text("\ufeffimage,prompt\nimg0.png,a red fox\nimg1.png,\nmissing.png,a cat\n", encoding="utf-8")
    out = tmp_path / "s.jsonl"
    res = run("score", tiny_model_file, "--images", manifest, "-o", out, "-q")
    assert res.exit_code == EXIT_ROW_ERRORS
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["error"] is None for r in recs] == [True, False, False]
    assert "missing prompt" in recs[1]["error"] and "file not found" in recs[2]["error"]
    assert isinstance(recs[0]["quality"], float) and recs[0]["prompt"] == "a red fox"


def test_manifest_without_image_column_is_refused_with_the_columns_found(tiny_model_file, tmp_path):
    (tmp_path / "m.csv").write_text("path,prompt\na.png,x\n")
    res = run("score", tiny_model_file, "--images", tmp_path / "m.csv")
    assert res.exit_code == 1 and "missing column(s) ['image']" in res.output and "Traceback" not in res.output


def test_folder_without_prompt_is_refused(tiny_model_file, folder):
    res = run("score", tiny_model_file, "--images", folder)
    assert res.exit_code == 1 and "--prompt" in res.output


def test_score_with_authors_pth_instead_of_model_says_how_to_import(authors_224_linear, folder):
    res = run("score", authors_224_linear[0], "--images", folder, "--prompt", "x")
    assert res.exit_code == 1 and "import-official" in res.output


def test_import_official_cli_writes_a_loadable_model(authors_224_linear, tmp_path):
    ft, clip_path, _, _ = authors_224_linear
    out = tmp_path / "m.safetensors"
    res = run("import-official", ft, "--clip", clip_path, "-o", out, "--outputs", "mos")
    assert res.exit_code == 0, res.output
    info = json.loads(run("info", out).output)
    assert (info["resolution"], info["outputs"], info["head"]) == (224, ["mos"], "linear")


def test_import_official_cli_failure_is_one_line_without_traceback(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 10)
    (tmp_path / "clip.pt").write_bytes(b"\x00" * 10)
    proc = subprocess.run([sys.executable, "-m", "ipiqa.cli", "import-official", str(tmp_path / "junk.pth"),
                           "--clip", str(tmp_path / "clip.pt"), "-o", str(tmp_path / "o.safetensors")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "junk.pth" in proc.stderr and "Traceback" not in proc.stderr


def test_help_teaches_with_examples():
    assert "Example" in run("score", "--help").output
    assert "import-official" in run("--help").output


# -- ipiqa info: a model file's config, or a bundle's summary

def test_info_of_a_model_file_prints_its_config(tiny_model_file):
    res = run("info", tiny_model_file)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == json.loads(read_config(tiny_model_file).to_json())


def test_info_of_a_bundle_prints_config_precision_graphs_versions_and_parity(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    res = run("info", tiny_bundle)
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["config"] == manifest["config"] and info["precision"] == "fp32"
    assert set(info["graphs"]) == {"image_encoder", "text_encoder", "fusion"}
    assert all((tiny_bundle / g["onnx"]).is_file() and g["engine"] is None for g in info["graphs"].values())
    assert info["engines"] is None  # exported with --onnx-only
    assert info["versions"] == manifest["versions"] and info["versions"]["ipiqa"]
    assert info["parity"] == manifest["parity"] and info["parity"]["onnx"]


def test_info_of_a_tampered_bundle_prints_the_bundle_error_in_one_line(tiny_bundle, tmp_path):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    victim = bundle / manifest["onnx"]["graphs"]["fusion"]["file"]
    victim.write_bytes(victim.read_bytes() + b"\0")
    res = run("info", bundle)
    assert res.exit_code == 1
    assert "SHA-256 does not match" in res.output and victim.name in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output


def test_info_of_a_folder_without_manifest_says_it_is_not_a_bundle(tmp_path):
    res = run("info", tmp_path)
    assert res.exit_code == 1 and "not an ipiqa bundle" in res.output and "Traceback" not in res.output


# -- optional dependencies: a base install (no torch, no open_clip) gets the pip command, never a traceback

HIDE_TORCH = '''
"""Loaded at start-up from PYTHONPATH: makes torch, torchvision and open_clip look uninstalled."""
import sys

class _HideModules:
    hidden = {"torch", "torchvision", "open_clip"}

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _HideModules())
'''


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory) -> dict:
    """Environment for a subprocess in which torch/open_clip cannot be imported, as on a base install."""
    site = tmp_path_factory.mktemp("hide_torch")
    (site / "sitecustomize.py").write_text(HIDE_TORCH)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def run_without_torch(env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ipiqa.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_the_test_environment_really_hides_torch(no_torch_env):
    proc = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=no_torch_env)
    assert proc.returncode == 1 and "No module named 'torch'" in proc.stderr


@pytest.fixture
def no_torch_inputs(tmp_path, tiny_model_file) -> dict:
    image = make_image(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("image,prompt,score\na.png,a cat,3.0\n")
    (tmp_path / "run").mkdir()
    return {"MODEL": tiny_model_file, "IMAGE": image, "DIR": tmp_path, "LABELS": tmp_path / "labels.csv",
            "RUN": tmp_path / "run", "OUT": tmp_path / "out"}


@pytest.mark.parametrize("args, extra", [
    (["score", "MODEL", "--images", "IMAGE", "--prompt", "p"], "torch"),
    (["import-official", "MODEL", "--clip", "MODEL", "-o", "OUT"], "torch"),
    (["demo", "--out", "OUT"], "export"),
    (["train", "finetune", "--dataset", "csv", "--labels", "LABELS", "--images", "DIR", "--out", "OUT",
      "--random-init"], "train"),
    (["train", "evaluate", "--dataset", "csv", "--labels", "LABELS", "--images", "DIR", "--run", "RUN"], "train"),
    (["train", "pretrain", "--pairs", "LABELS", "--images", "DIR", "--out", "OUT", "--random-init"], "train"),
], ids=lambda v: " ".join(v[:2]) if isinstance(v, list) else v)
def test_command_needing_torch_on_a_base_install_names_the_pip_command_in_one_line(no_torch_env, no_torch_inputs,
                                                                                      args, extra):
    proc = run_without_torch(no_torch_env, *[no_torch_inputs.get(a, a) for a in args])
    assert proc.returncode == 1, proc.stderr
    assert f"pip install 'ipiqa[{extra}]'" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_info_of_a_bundle_works_without_torch(no_torch_env, tiny_bundle):
    proc = run_without_torch(no_torch_env, "info", tiny_bundle)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["precision"] == "fp32"


def test_info_of_a_model_file_works_without_torch(no_torch_env, tiny_model_file):
    proc = run_without_torch(no_torch_env, "info", tiny_model_file)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["resolution"] == 64


def test_torch_backend_without_torch_raises_missing_dependency(no_torch_env, tiny_model_file):
    code = ("from ipiqa.errors import MissingDependencyError\n"
            "from ipiqa.runtime.backends.pytorch import TorchBackend\n"
            "try:\n"
            f"    TorchBackend({str(tiny_model_file)!r})\n"
            "except MissingDependencyError as exc:\n"
            "    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=no_torch_env)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'ipiqa[torch]'" in proc.stdout


# -- words for users: the label file each dataset ships, no development paths

@pytest.mark.parametrize("command", ["finetune", "evaluate"])
def test_train_labels_help_names_each_datasets_label_file(command):
    text = " ".join(run("train", command, "--help").output.split())
    for dataset, (label_file, _) in DATASETS.items():
        assert f"{dataset} {label_file}" in text


def test_train_help_has_no_development_paths():
    for args in (["train", "--help"], ["train", "finetune", "--help"], ["train", "evaluate", "--help"]):
        assert "shared/" not in run(*args).output


@pytest.mark.slow
def test_demo_runs_torch_export_and_runtime_which_agree(tmp_path):
    res = run("demo", "--out", tmp_path / "demo", "--resolution", "224")
    assert res.exit_code == 0, res.output
    ref, rt = (_read_csv(tmp_path / "demo" / f"scores_{k}.csv") for k in ("torch", "runtime"))
    assert len(ref) == len(rt) == 7 and sum(bool(r["error"]) for r in rt) == 1
    assert len({r["quality"] for r in ref if not r["error"]}) == 6  # inputs differ -> scores differ
    scored = [r for r in ref if not r["error"]]  # the gate's FP32 rule on these inputs
    tolerance = fp32_rule_tolerance(tmp_path / "demo" / "model.safetensors", [r["image"] for r in scored],
                                    [r["prompt"] for r in scored])
    for a, b in zip(ref, rt):
        if not a["error"]:
            assert abs(float(a["quality"]) - float(b["quality"])) <= tolerance
    assert "torch" in res.output and "runtime" in res.output
