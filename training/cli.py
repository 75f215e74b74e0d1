"""``ipiqa train pretrain|finetune|evaluate``: the paper's protocol from the command line.

Every TrainConfig field can come from ``--config file.yaml|json``; flags given on the command line win.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Optional

import click

from ipiqa.console import InputPath, device_option, friendly, format_table, text_option
from ipiqa._optional import require, require_torch
from ipiqa.device import DEVICE_HELP

__all__ = ["train"]

# The label file each dataset ships with, named as its authors publish it (training/data.py reads them).
LABELS_HELP = ("The dataset's label file, or the folder that holds it: agiqa-1k AIGC_MOS_Zscore.xlsx, "
               "agiqa-3k data.csv, aigcqa-20k info_train.csv; for --dataset csv, your own CSV with "
               "columns image,prompt,score[,score2].")


# Ranges of the TrainConfig numbers (their types come from the defaults); resolution, head, dropout and arch are
# the model's and are checked by IPIQAConfig, device by ipiqa.device.
_RANGES = {"epochs": (1, "an integer >= 1"), "batch_size": (1, "an integer >= 1"), "accumulate": (1, "an integer >= 1"),
           "workers": (0, "an integer >= 0"), "seed": (0, "an integer >= 0"), "lr": (0.0, "a number > 0"),
           "head_lr_scale": (0.0, "a number > 0"), "weight_decay": (0.0, "a number >= 0")}
_OPEN = {"lr", "head_lr_scale"}  # > rather than >=
_MODEL_KEYS = ("resolution", "head", "dropout")


def _value_problem(key: str, value, default) -> Optional[str]:
    """Why ``value`` cannot be TrainConfig's ``key`` (whose default is ``default``), or None."""
    import math

    what = _RANGES.get(key, (None, ""))[1]
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok and value >= _RANGES.get(key, (value,))[0] else f"must be {what or 'an integer'}"
    if isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        low = _RANGES.get(key, (None,))[0]
        if ok and low is not None:
            ok = value > low if key in _OPEN else value >= low
        return None if ok else f"must be {what or 'a number'}"
    if isinstance(default, str):
        if not isinstance(value, str):
            return "must be text"
        if key == "device":
            from ipiqa.device import parse_device
            from ipiqa.errors import IPIQAError

            try:
                parse_device(value)
            except IPIQAError as exc:
                return str(exc)
        return None
    if isinstance(default, dict):
        return None if isinstance(value, dict) else "must be a mapping of IPIQAConfig fields, e.g. {vision_width: 32}"
    return None


def _problems(data: dict, defaults: dict) -> list[tuple[str, str]]:
    """(key, message) for each value of ``data`` (TrainConfig fields) that is wrong, the model's keys included."""
    from ipiqa.config import IPIQAConfig
    from ipiqa.errors import ConfigError

    problems = [(k, f"{k}={v!r}: {why}") for k, v in data.items() if (why := _value_problem(k, v, defaults[k]))]
    if not problems:
        arch = dict(data.get("arch", defaults["arch"]))
        taken = sorted(set(arch) & {*_MODEL_KEYS, "outputs"}, key=str)
        if taken:
            return [("arch", f"arch={arch!r}: {taken} are not arch keys (resolution, head and dropout are top-level "
                             "keys; outputs come from the dataset)")]
        model = {k: data.get(k, defaults[k]) for k in _MODEL_KEYS}
        try:
            IPIQAConfig.from_dict({**model, **arch})
        except ConfigError as exc:
            key = next((k for k in _MODEL_KEYS if f"{k}=" in str(exc)), "arch")
            problems.append((key, str(exc)))
    return problems


def _read_config_file(path: Path) -> dict:
    from ipiqa.errors import ConfigError

    hint = "--config takes a YAML (.yaml/.yml) or JSON file of TrainConfig fields"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; {hint}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        yaml = require("yaml", extra="train")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            why = getattr(exc, "problem", None) or " ".join(str(exc).split())
            raise ConfigError(f"{path}: not valid YAML ({why}{where}); {hint}") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc}); {hint}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: holds a {type(data).__name__}, not a mapping of keys to values; {hint}")
    return data


def _config(path: Optional[Path], overrides: dict):
    """TrainConfig from ``--config`` and the flags (which win), checked before any data is read: a wrong value is a
    usage error (exit 2) naming ``--config`` FILE and the key, or the flag."""
    from ipiqa.errors import ConfigError

    from .loop import TrainConfig

    defaults = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(TrainConfig)}
    try:
        data = _read_config_file(path) if path is not None else {}
        unknown = sorted(set(data) - set(defaults), key=str)
        if unknown:
            raise ConfigError(f"{path}: unknown keys {unknown}; known: {sorted(defaults)}")
        problems = _problems(data, defaults)
        if problems:
            raise ConfigError(f"{path}: " + "; ".join(p for _, p in problems))
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="'--config'") from None
    flags = {k: v for k, v in overrides.items() if v is not None}
    for key, problem in _problems({**data, **flags}, defaults):
        # the file alone was valid: a flag's value (or the file's together with the flags')
        raise click.BadParameter(problem if key in flags else f"{path}: {problem}",
                                 param_hint=f"'--{key.replace('_', '-')}'" if key in flags else "'--config'")
    return TrainConfig(**{**data, **flags})


def _common(fn):
    for opt in reversed([
        click.option("--config", "config_path", type=InputPath(exists=True, dir_okay=False, path_type=Path),
                     help="YAML/JSON with TrainConfig fields (flags override it)."),
        click.option("--images", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="Folder with the dataset's images."),
        click.option("--epochs", type=int), click.option("--batch-size", type=int), click.option("--lr", type=float),
        click.option("--resolution", type=int), click.option("--seed", type=int),
        click.option("--device", callback=device_option, help=DEVICE_HELP), click.option("--workers", type=int),
        click.option("--clip", "clip_path", type=InputPath(exists=True, dir_okay=False, path_type=Path),
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
@click.option("--dataset", required=True, callback=text_option,
              help="agiqa-1k, agiqa-3k, aigcqa-20k, or csv (image,prompt,score[,score2]).")
@click.option("--labels", required=True, type=InputPath(exists=True, path_type=Path), help=LABELS_HELP)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder.")
@click.option("--splits", default=10, show_default=True, type=click.IntRange(1),
              help="Grouped 80/20 splits (seeds seed, seed+1, ...).")
@click.option("--only-split", type=click.IntRange(0), default=None, help="Train just this split index (0 to SPLITS-1).")
@click.option("--init", type=InputPath(exists=True, dir_okay=False, path_type=Path),
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

    from ipiqa.checkpoint import read_config

    from .data import check_images, load_samples
    from .loop import config_dict, finetune_split, resolve_device
    from .splits import make_splits, write_split

    _need_init(clip_path, init, random_init)
    if only_split is not None and only_split >= splits:
        raise click.BadParameter(f"split {only_split} of {splits} (0 to {splits - 1}); raise --splits or lower it",
                                 param_hint="'--only-split'")
    cfg = _config(config_path, _overrides(**kw))
    resolve_device(cfg.device)  # a GPU torch cannot see is refused before any data is read
    if init is not None:
        read_config(init)  # metadata only: a file that is not an ipiqa model or pretrain file, refused now
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
@click.option("--dataset", required=True, callback=text_option, help="agiqa-1k, agiqa-3k, aigcqa-20k, or csv (as in finetune).")
@click.option("--labels", required=True, type=InputPath(exists=True, path_type=Path), help=LABELS_HELP)
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--run", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A finetune run folder: splits/splitK.json and splitK/best.safetensors.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--plcc-fit", is_flag=True, help="4-parameter logistic fit before PLCC.")
@click.option("--device", default="auto", show_default=True, callback=device_option, help=DEVICE_HELP)
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
@click.option("--pairs", required=True, type=InputPath(exists=True, dir_okay=False, path_type=Path),
              help="CSV with image,prompt columns (e.g. a DiffusionDB subset).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--min-similarity", type=click.FloatRange(-1.0, 1.0), default=None, help="Keep pairs with initial CLIP similarity above this (paper: 0.35).")
@_common
@friendly
def pretrain_cmd(pairs, out, min_similarity, config_path, images, clip_path, random_init, **kw) -> None:
    """Image2Prompt pretraining: image encoder trained, text tower frozen, loss 1 - cos(image, prompt)."""
    require_torch(extra="train")
    from ipiqa.runtime.io import read_rows

    from .data import Sample, check_images
    from .loop import pretrain, resolve_device

    _need_init(clip_path, None, random_init)
    cfg = _config(config_path, _overrides(**kw))
    resolve_device(cfg.device)  # a GPU torch cannot see is refused before any data is read
    rows = read_rows(pairs)
    samples = check_images([Sample(Path(r.image).name if Path(r.image).parent == pairs.parent else r.image,
                                   r.prompt or "", (0.0,)) for r in rows], images)
    path = pretrain(cfg, samples, images, out, clip_path, min_similarity,
                    progress=lambda r: click.echo(json.dumps(r), err=True))
    click.echo(f"wrote {path}; fine-tune from it with: ipiqa train finetune ... --init {path}", err=True)
