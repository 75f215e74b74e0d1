"""Training on tiny data: learning happens, frozen stays frozen, resume is exact, splits never leak, metrics = scipy."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from scipy import stats

from conftest import fp32_rule_tolerance
from ipiqa.checkpoint import load_model
from ipiqa.cli import cli
from ipiqa.demo import SMOKE_ARCH
from ipiqa.errors import IPIQAError, MissingDependencyError
from ipiqa.training.data import Sample, load_samples
from ipiqa.training.loop import TrainConfig, build_model, finetune_split, pretrain
from ipiqa.training.metrics import krcc, plcc, srcc
from ipiqa.training.splits import group_of, make_split, make_splits

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
needs_labels = pytest.mark.skipif(not DATASETS.is_dir(), reason="../shared/datasets is not beside this checkout")
SMALL = dict(resolution=64, arch=SMOKE_ARCH)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A dozen images whose brightness is their MOS, one prompt each (12 groups: both test splits are non-empty)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    samples = []
    for i in range(12):
        level = i / 11
        arr = np.clip(level * 255 + rng.normal(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / f"img{i}.png")
        samples.append(Sample(f"img{i}.png", f"prompt {i}", (level * 4 + 1, 5 - level * 4)))
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "prompt", "score", "score2"])
        w.writerows([s.image, s.prompt, *s.targets] for s in samples)
    return root, samples


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**SMALL, "epochs": 3, "batch_size": 4, "lr": 1e-3, "workers": 0, "device": "cpu", "seed": 1, **kw})


def test_loss_decreases_on_a_learnable_task(tiny_data, tmp_path):
    root, samples = tiny_data
    finetune_split(_cfg(epochs=6), samples, samples[:4], root, ("quality", "alignment"), tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["train_loss"] < log[0]["train_loss"] * 0.7
    assert (tmp_path / "run" / "best.safetensors").is_file()


def test_frozen_parameters_stay_bit_identical_and_trainable_ones_change(tiny_data, tmp_path):
    root, samples = tiny_data
    cfg = _cfg(epochs=1)
    before = build_model(cfg.model_config(("quality", "alignment")), seed=cfg.seed).state_dict()
    before = {k: v.clone() for k, v in before.items()}
    finetune_split(cfg, samples, [], root, ("quality", "alignment"), tmp_path / "run")
    after = load_model(tmp_path / "run" / "final.safetensors").state_dict()
    frozen = [k for k in before if k.startswith(("text.transformer.", "text.ln_final."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    for k in ("visual.conv1.weight", "txt_attnpool.cross_attn.q_proj.weight", "head.dense.weight",
              "text.token_embedding.weight", "text.text_projection", "text.positional_embedding"):
        assert not torch.equal(before[k], after[k]), k


def test_resume_continues_the_same_trajectory(tiny_data, tmp_path):
    root, samples = tiny_data
    finetune_split(_cfg(epochs=3), samples, samples[:4], root, ("quality", "alignment"), tmp_path / "straight")
    finetune_split(_cfg(epochs=1), samples, samples[:4], root, ("quality", "alignment"), tmp_path / "resumed")
    finetune_split(_cfg(epochs=3), samples, samples[:4], root, ("quality", "alignment"), tmp_path / "resumed", resume=True)
    a = load_model(tmp_path / "straight" / "final.safetensors").state_dict()
    b = load_model(tmp_path / "resumed" / "final.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_moves_image_embeddings_toward_prompts_with_text_frozen(tiny_data, tmp_path):
    root, samples = tiny_data
    path = pretrain(_cfg(epochs=4), samples, root, tmp_path / "pre")
    log = [json.loads(line) for line in (tmp_path / "pre" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["cosine_loss"] < log[0]["cosine_loss"]
    model = build_model(_cfg().model_config(("quality",)), init=path, seed=99)
    assert model.cfg.resolution == 64  # a fine-tune can start from it


def test_clip_score_filter_keeps_only_pairs_above_threshold(tiny_data, tmp_path):
    root, samples = tiny_data
    seen = []
    pretrain(_cfg(epochs=1), samples, root, tmp_path / "pre", min_similarity=-1.0, progress=seen.append)
    assert seen[0] == {"filter": -1.0, "kept": 12, "of": 12}
    with pytest.raises(IPIQAError, match="no \\(image, prompt\\) pairs"):
        pretrain(_cfg(epochs=1), samples, root, tmp_path / "pre2", min_similarity=1.0)


@needs_labels
@pytest.mark.parametrize("dataset,labels", [("agiqa-3k", "agiqa-3k"), ("aigcqa-20k", "aigcqa-20k"),
                                            ("agiqa-1k", "agiqa-1k")])
def test_grouped_splits_never_share_a_group(dataset, labels):
    samples, _ = load_samples(dataset, DATASETS / labels)
    by_name = {s.image: s for s in samples}
    for split in make_splits(dataset, samples, seed=42, repeats=3):
        train = {group_of(dataset, by_name[n]) for n in split.train}
        test = {group_of(dataset, by_name[n]) for n in split.test}
        assert not train & test and len(split.train) + len(split.test) == len(samples)
        assert 0.7 < len(split.train) / len(samples) < 0.9


@needs_labels
def test_agiqa3k_split_reproduces_the_authors_permutation():
    samples, outputs = load_samples("agiqa-3k", DATASETS / "agiqa-3k")
    np.random.seed(42)  # the authors: seed_everything(42); np.random.permutation(300)[:240]
    chosen = set(np.random.permutation(300)[:240].tolist())
    split = make_split("agiqa-3k", samples, 42)
    assert outputs == ("quality", "alignment")
    assert set(split.train) == {s.image for s in samples if int(Path(s.image).stem.split("_")[-1]) in chosen}


@needs_labels
def test_agiqa1k_uses_prompts_from_the_xlsx_and_object_pair_groups():
    samples, outputs = load_samples("agiqa-1k", DATASETS / "agiqa-1k")
    assert outputs == ("quality",) and len(samples) > 900 and all(s.prompt for s in samples)
    dream = next(s for s in samples if s.image.startswith("dream"))
    parts = Path(dream.image).stem.split("_")
    a, b = int(parts[1]), int(parts[2])
    assert group_of("agiqa-1k", dream) == f"{a + 1 if a > 5 else a}_{b + 5}"


def test_metrics_equal_scipy():
    rng = np.random.default_rng(3)
    x = rng.normal(size=200)
    y = x + rng.normal(scale=0.7, size=200)
    y[:20] = np.round(y[:20])  # ties
    assert srcc(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert plcc(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert krcc(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    assert plcc(x, 3 + 2 / (1 + np.exp(-y)), fit=True) > plcc(x, 3 + 2 / (1 + np.exp(-y)))


def test_training_metrics_are_the_shared_numpy_metrics():
    """One implementation: the parity gate's Spearman and training's SRCC are the same function."""
    from ipiqa import metrics
    from ipiqa.export import parity

    assert srcc is metrics.srcc and krcc is metrics.krcc and parity.spearman is metrics.srcc


def test_shared_metrics_and_parity_import_neither_torch_nor_scipy():
    """export/ depends on ipiqa.metrics, not on training/: an export-only install needs no torch or scipy for it."""
    code = ("import sys, ipiqa.metrics, ipiqa.export.parity; "
            "print(sorted(m for m in ('torch', 'scipy', 'ipiqa.training') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_logistic_fit_without_scipy_names_the_train_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # what an install without scipy looks like to import
    with pytest.raises(MissingDependencyError, match=r"pip install 'ipiqa\[train\]'"):
        plcc([1.0, 2.0, 3.0], [1.0, 3.0, 2.0], fit=True)


def test_missing_images_are_listed_with_the_count(tiny_data, tmp_path):
    root, _ = tiny_data
    res = CliRunner().invoke(cli, ["train", "finetune", "--dataset", "csv", "--labels", str(root / "labels.csv"),
                                   "--images", str(tmp_path), "--out", str(tmp_path / "r"), "--random-init"])
    assert res.exit_code == 1 and "12 of 12 images missing (first: img0.png" in res.output


def test_finetune_cli_then_export_then_runtime_round_trip(tiny_data, tmp_path):
    root, _ = tiny_data
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"resolution": 64, "arch": SMOKE_ARCH, "batch_size": 4, "lr": 1e-3, "workers": 0}))
    res = CliRunner().invoke(cli, ["train", "finetune", "--dataset", "csv", "--labels", str(root / "labels.csv"),
                                   "--images", str(root), "--out", str(tmp_path / "run"), "--splits", "2",
                                   "--epochs", "1", "--device", "cpu", "--config", str(config), "--random-init"])
    assert res.exit_code == 0, res.output
    assert "SRCC" in res.output and (tmp_path / "run" / "splits" / "split1.json").is_file()
    model_path = tmp_path / "run" / "split0" / "best.safetensors"
    from ipiqa.export.cli import main as export_cli
    res = CliRunner().invoke(export_cli, [str(model_path), "-o", str(tmp_path / "bundle"), "--onnx-only"])
    assert res.exit_code == 0, res.output
    from ipiqa.runtime.scorer import Scorer
    model = load_model(model_path)
    with Scorer(tmp_path / "bundle", device="cpu") as rt, Scorer(model_path, backend="torch", device="cpu") as ref:
        imgs = [root / "img0.png", root / "img5.png"]
        tolerance = fp32_rule_tolerance(model_path, imgs, ["prompt 0", "prompt 1"])  # the gate's rule on these inputs
        for a, b in zip(rt.score(imgs, ["prompt 0", "prompt 1"]), ref.score(imgs, ["prompt 0", "prompt 1"])):
            assert abs(a["quality"] - b["quality"]) <= tolerance
    assert model.cfg.outputs == ("quality", "alignment")
    res = CliRunner().invoke(cli, ["train", "evaluate", "--dataset", "csv", "--labels", str(root / "labels.csv"),
                                   "--images", str(root), "--run", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    evaluated = json.loads((tmp_path / "run" / "summary.json").read_text())["splits"]
    assert evaluated == sum(bool(json.loads(p.read_text())["test"]) for p in (tmp_path / "run" / "splits").iterdir())


def test_unknown_config_keys_are_refused(tiny_data, tmp_path):
    root, _ = tiny_data
    (tmp_path / "c.json").write_text(json.dumps({"learning_rate": 1}))
    res = CliRunner().invoke(cli, ["train", "finetune", "--dataset", "csv", "--labels", str(root / "labels.csv"),
                                   "--images", str(root), "--out", str(tmp_path / "r"), "--random-init",
                                   "--config", str(tmp_path / "c.json")])
    assert res.exit_code == 2 and "learning_rate" in res.output
