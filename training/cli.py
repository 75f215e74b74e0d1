"""``ipiqa train pretrain|finetune|evaluate``: the paper's protocol from the command line.

Every TrainConfig field can come from ``--config file.yaml|json``; flags given on the command line win.
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Optional

import click

from ipiqa.console import friendly, format_table
from ipiqa._optional import require, require_torch
from ipiqa.device import DEVICE_HELP

__all__ = ["train"]

# The label file each dataset ships with, named as its authors publish it (training/data.py reads them).
LABELS_HELP = ("The dataset's label file, or the folder that holds it: agiqa-1k AIGC_MOS_Zscore.xlsx, "
               "agiqa-3k data.csv, aigcqa-20k info_train.csv; for --dataset csv, your own CSV with "
               "columns image,prompt,score[,score2].")


def _config(path: Optional[Path], overrides: dict):
    from .loop import TrainConfig

    data: dict = {}
    if path is not None:
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            data = require("yaml", extra="train").safe_load(text) or {}
        else:
            data = json.loads(text)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise click.BadParameter(f"{path}: unknown keys {unknown}; known: {sorted(known)}", param_hint="--config")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**data)


def _common(fn):
    for opt in reversed([
        click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="YAML/JSON with TrainConfig fields (flags override it)."),
        click.option("--images", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="Folder with the dataset's images."),
        click.option("--epochs", type=int), click.option("--batch-size", type=int), click.option("--lr", type=float),
        click.option("--resolution", type=int), click.option("--seed", type=int),
        click.option("--device", help=DEVICE_HELP), click.option("--workers", type=int),
        click.option("--clip", "clip_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Base CLIP RN50 weights to start from (OpenAI RN50.pt or a state_dict)."),
        click.option("--random-init", is_flag=True, help="Start from seeded random weights (tests, smoke runs)."),
    ]):
        fn = opt(fn)
    return fn


def _overrides(**kw) -> dict:
    return {k: v for k, v in kw.items() if k in ("epochs", "batch_size", "lr", "resolution", "seed", "device", "workers")}


def _need_init(clip_path, init, random_init) -> None:
    if not (clip_path or init or random_init):
        raise click.UsageError("say where training starts: --clip RN50.pt, --init MODEL.safetensors, or --random-init")


@click.group()
def train() -> None:
    """Train IP-IQA models: Image2Prompt pretraining, MOS fine-tuning, evaluation over grouped splits.

    \b
    Reproducing the paper's AGIQA-3k row (GPU; AGIQA-3k's data.csv and images downloaded to AGIQA-3k/):
      ipiqa train finetune --dataset agiqa-3k --labels AGIQA-3k/data.csv --images AGIQA-3k/ \\
          --clip RN50.pt --out runs/agiqa3k --splits 10
      ipiqa train evaluate --dataset agiqa-3k --labels AGIQA-3k/data.csv --images AGIQA-3k/ --run runs/agiqa3k

    \b
    --labels takes the label file each dataset ships:
      --dataset agiqa-1k     AIGC_MOS_Zscore.xlsx  (columns Image, Prompt, MOS)
      --dataset agiqa-3k     data.csv              (name, prompt, mos_quality, mos_align)
      --dataset aigcqa-20k   info_train.csv        (name, prompt, mos)
      --dataset csv          your own CSV          (image, prompt, score[, score2])
    """


@train.command("finetune")
@click.option("--dataset", required=True, help="agiqa-1k, agiqa-3k, aigcqa-20k, or csv (image,prompt,score[,score2]).")
@click.option("--labels", required=True, type=click.Path(exists=True, path_type=Path), help=LABELS_HELP)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder.")
@click.option("--splits", default=10, show_default=True, help="Grouped 80/20 splits (seeds seed, seed+1, ...).")
@click.option("--only-split", type=int, default=None, help="Train just this split index.")
@click.option("--init", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Start from an ipiqa model or pretrain image_encoder.safetensors.")
@click.option("--skip-missing", is_flag=True, help="Train without label rows whose image is missing.")
@click.option("--resume", is_flag=True, help="Continue each split from its last.pt.")
@_common
@friendly
def finetune_cmd(dataset, labels, out, splits, only_split, init, skip_missing, resume, config_path, images, clip_path,
                 random_init, **kw) -> None:
    """Fine-tune on MOS with MSE (Adam lr 1e-5, head x10, batch 32, 100 epochs, dropout 0.5, h-flip)."""
    require_torch(extra="train")
    from tqdm import tqdm

    from .data import check_images, load_samples
    from .loop import config_dict, finetune_split
    from .splits import make_splits, write_split

    _need_init(clip_path, init, random_init)
    cfg = _config(config_path, _overrides(**kw))
    samples, outputs = load_samples(dataset, labels)
    samples = check_images(samples, images, skip_missing)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_dict(cfg), indent=1) + "\n")
    by_name = {s.image: s for s in samples}
    results = []
    for k, split in enumerate(make_splits(dataset, samples, cfg.seed, splits)):
        if only_split is not None and k != only_split:
            continue
        write_split(split, out / "splits" / f"split{k}.json")
        with tqdm(total=cfg.epochs, desc=f"split {k}", unit="epoch") as bar:
            best = finetune_split(cfg, [by_name[n] for n in split.train], [by_name[n] for n in split.test], images,
                                  outputs, out / f"split{k}", init, clip_path, resume,
                                  progress=lambda r: (bar.update(1), bar.set_postfix(loss=r["train_loss"])))
        results.append(best.get("metrics", {}))
    _print_summary(results, outputs, out)


def _print_summary(results: list[dict], outputs, out: Path) -> None:
    import numpy as np

    rows, summary = [], {}
    for o in outputs:
        cells = [o]
        for m in ("srcc", "plcc", "krcc"):
            vals = [r[o][m] for r in results if o in r]
            summary[f"{o}_{m}"] = {"mean": float(np.mean(vals)) if vals else None, "std": float(np.std(vals)) if vals else None}
            cells.append(f"{np.mean(vals):.4f} ± {np.std(vals):.4f}" if vals else "")
        rows.append(cells)
    click.echo(format_table(["output", "SRCC", "PLCC", "KRCC"], rows))
    (out / "summary.json").write_text(json.dumps({"splits": len(results), **summary}, indent=1) + "\n")


@train.command("evaluate")
@click.option("--dataset", required=True, help="agiqa-1k, agiqa-3k, aigcqa-20k, or csv (as in finetune).")
@click.option("--labels", required=True, type=click.Path(exists=True, path_type=Path), help=LABELS_HELP)
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--run", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A finetune run folder: splits/splitK.json and splitK/best.safetensors.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--plcc-fit", is_flag=True, help="4-parameter logistic fit before PLCC.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@friendly
def evaluate_cmd(dataset, labels, images, run, batch_size, plcc_fit, device) -> None:
    """Evaluate each split's best model on its test images; prints mean ± std over the splits."""
    require("torch", extra="train")
    require("open_clip", extra="train")
    if plcc_fit:
        require("scipy", extra="train")  # the logistic fit (training.metrics) uses scipy.optimize
    from torch.utils.data import DataLoader  # torch is there: checked just above

    from ipiqa.checkpoint import load_model

    from .data import ImageScoreDataset, load_samples
    from .loop import evaluate_model, resolve_device
    from .splits import read_split

    samples, outputs = load_samples(dataset, labels)
    by_name = {s.image: s for s in samples}
    results = []
    device = resolve_device(device)
    for split_file in sorted((run / "splits").glob("split*.json")):
        model_path = run / split_file.stem / "best.safetensors"
        split = read_split(split_file)
        if not split.test:
            click.echo(f"{split_file}: empty test side (too few groups); skipped", err=True)
            continue
        model = load_model(model_path, device)
        data = ImageScoreDataset([by_name[n] for n in split.test], images, model.cfg.resolution, False,
                                 model.cfg.context_length, targets=model.cfg.num_outputs)
        results.append(evaluate_model(model, DataLoader(data, batch_size=batch_size), device, plcc_fit))
    if not results:
        raise click.ClickException(f"{run}: no splits/split*.json with a test side and split*/best.safetensors")
    _print_summary(results, outputs, run)


@train.command("pretrain")
@click.option("--pairs", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV with image,prompt columns (e.g. a DiffusionDB subset).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--min-similarity", type=float, default=None, help="Keep pairs with initial CLIP similarity above this (paper: 0.35).")
@_common
@friendly
def pretrain_cmd(pairs, out, min_similarity, config_path, images, clip_path, random_init, **kw) -> None:
    """Image2Prompt pretraining: image encoder trained, text tower frozen, loss 1 - cos(image, prompt)."""
    require_torch(extra="train")
    from ipiqa.runtime.io import read_rows

    from .data import Sample, check_images
    from .loop import pretrain

    _need_init(clip_path, None, random_init)
    cfg = _config(config_path, _overrides(**kw))
    rows = read_rows(pairs)
    samples = check_images([Sample(Path(r.image).name if Path(r.image).parent == pairs.parent else r.image,
                                   r.prompt or "", (0.0,)) for r in rows], images)
    path = pretrain(cfg, samples, images, out, clip_path, min_similarity,
                    progress=lambda r: click.echo(json.dumps(r), err=True))
    click.echo(f"wrote {path}; fine-tune from it with: ipiqa train finetune ... --init {path}", err=True)
