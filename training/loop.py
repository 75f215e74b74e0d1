"""Fine-tuning on MOS (MSE) and Image2Prompt pretraining (1 - cos), with the authors' settings as defaults.

Trainable, as in the authors' code: the image trunk, both pools, the head, the token-embedding table
([QA] is implemented by unfreezing it), the text positional embedding and text projection. Frozen: the
12 text transformer blocks and ``ln_final``. Each epoch is reproducible from (seed, epoch), and the
checkpoint carries optimizer, scaler and RNG state, so a resumed run continues the same trajectory.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from ipiqa.checkpoint import load_state_dict, save_model
from ipiqa.config import IPIQAConfig
from ipiqa.device import parse_device
from ipiqa.errors import IPIQAError
from ipiqa.model import IPIQA

from .data import ImageScoreDataset, Sample
from .metrics import all_metrics

__all__ = ["TrainConfig", "build_model", "trainable_parameters", "finetune_split", "evaluate_model", "pretrain"]
log = logging.getLogger(__name__)
FROZEN_PREFIXES = ("text.transformer.", "text.ln_final.")


@dataclass
class TrainConfig:
    """Defaults are the authors' AGIQA-3k setup; every field can come from --config or a flag."""

    resolution: int = 512
    head: str = "mlp"
    dropout: float = 0.5
    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-5
    head_lr_scale: float = 10.0
    weight_decay: float = 0.0
    accumulate: int = 1  # gradient accumulation steps (effective batch = batch_size * accumulate)
    amp: bool = True  # mixed precision, CUDA only
    seed: int = 42
    device: str = "auto"
    workers: int = 4
    plcc_fit: bool = False  # 4-parameter logistic before PLCC
    arch: dict = field(default_factory=dict)  # backbone overrides (tests use a reduced-width trunk)

    def model_config(self, outputs: tuple[str, ...]) -> IPIQAConfig:
        return IPIQAConfig(resolution=self.resolution, outputs=outputs, head=self.head, dropout=self.dropout, **self.arch)


def resolve_device(name: str) -> torch.device:
    """``--device`` through the one rule (ipiqa.device); a CUDA device torch cannot see is refused."""
    return torch.device(parse_device(name).resolve_torch())


def build_model(cfg: IPIQAConfig, init: Optional[Path] = None, clip: Optional[Path] = None, seed: int = 0) -> IPIQA:
    """A model to train: from our model/pretrain file (``init``), from base CLIP weights, or seeded random."""
    torch.manual_seed(seed)
    model = IPIQA(cfg)
    if init is not None:
        init_cfg, sd = load_state_dict(init)
        if (init_cfg.resolution, init_cfg.vision_width, init_cfg.vision_layers) != (cfg.resolution, cfg.vision_width, cfg.vision_layers):
            raise IPIQAError(f"{init}: made for {init_cfg.resolution}px/{init_cfg.vision_layers}, training is {cfg.resolution}px")
        result = model.load_state_dict({k: v for k, v in sd.items() if k in model.state_dict() and
                                        v.shape == model.state_dict()[k].shape}, strict=False)
        if any(k.startswith("visual.") for k in result.missing_keys):
            raise IPIQAError(f"{init}: image encoder incomplete (missing {result.missing_keys[:3]})")
    elif clip is not None:
        from ipiqa.official import init_from_clip, read_clip_base
        init_from_clip(model, read_clip_base(clip))
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(FROZEN_PREFIXES))
    return model


def trainable_parameters(model: IPIQA, lr: float, head_scale: float, weight_decay: float) -> list[dict]:
    head = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("head.")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    return [{"params": rest, "lr": lr, "weight_decay": weight_decay},
            {"params": head, "lr": lr * head_scale, "weight_decay": weight_decay}]


@torch.no_grad()
def predict(model: IPIQA, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    preds, targets = [], []
    for x, t, y in loader:
        preds.append(model(x.to(device), t.to(device)).float().cpu())
        targets.append(y)
    return torch.cat(preds).numpy(), torch.cat(targets).numpy()


def evaluate_model(model: IPIQA, loader: DataLoader, device: torch.device, plcc_fit: bool = False) -> dict:
    pred, mos = predict(model, loader, device)
    return {name: all_metrics(pred[:, j], mos[:, j], plcc_fit) for j, name in enumerate(model.cfg.outputs)}


def _loader(samples, images, cfg: TrainConfig, model_cfg: IPIQAConfig, train: bool, epoch: int) -> DataLoader:
    data = ImageScoreDataset(samples, images, model_cfg.resolution, train, model_cfg.context_length,
                             seed=cfg.seed * 1000 + epoch, targets=model_cfg.num_outputs)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    return DataLoader(data, batch_size=cfg.batch_size, shuffle=train, generator=g, num_workers=cfg.workers,
                      drop_last=False)


def _checkpoint(path: Path, model, optimizer, scaler, epoch: int, best: dict) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "epoch": torch.tensor(epoch), "best": json.dumps(best), "torch_rng": torch.get_rng_state()}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def finetune_split(cfg: TrainConfig, train: list[Sample], test: list[Sample], images: Path, outputs: tuple[str, ...],
                   out: Path, init: Optional[Path] = None, clip: Optional[Path] = None, resume: bool = False,
                   progress: Callable[[dict], None] = lambda r: None) -> dict:
    """Train one split; writes ``best.safetensors``, ``last.pt`` (resume) and ``log.jsonl`` in ``out``."""
    device = resolve_device(cfg.device)
    model_cfg = cfg.model_config(outputs)
    model = build_model(model_cfg, init, clip, cfg.seed).to(device)
    optimizer = torch.optim.Adam(trainable_parameters(model, cfg.lr, cfg.head_lr_scale, cfg.weight_decay))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    out.mkdir(parents=True, exist_ok=True)
    start_epoch, best = 0, {"epoch": -1, "srcc": -math.inf}
    last = out / "last.pt"
    if resume and last.is_file():
        state = torch.load(last, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        start_epoch, best = int(state["epoch"]) + 1, json.loads(state["best"])
        log.info("resumed %s at epoch %d", out, start_epoch)
    test_loader = _loader(test, images, cfg, model_cfg, False, 0)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0, losses = time.perf_counter(), []
        optimizer.zero_grad(set_to_none=True)
        loader = _loader(train, images, cfg, model_cfg, True, epoch)
        for step, (x, t, y) in enumerate(loader):
            with torch.autocast(device.type, enabled=use_amp):
                loss = torch.nn.functional.mse_loss(model(x.to(device), t.to(device)).float(), y.to(device))
            scaler.scale(loss / cfg.accumulate).backward()
            if (step + 1) % cfg.accumulate == 0 or step + 1 == len(loader):
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        metrics = evaluate_model(model, test_loader, device, cfg.plcc_fit) if test else {}
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None,
                  "seconds": time.perf_counter() - t0, **{f"{o}_{k}": v for o, m in metrics.items() for k, v in m.items()}}
        score = metrics[outputs[0]]["srcc"] if metrics else -float(record["train_loss"] or 0)
        score = -math.inf if math.isnan(score) else score  # e.g. a one-image test side: no ranking to measure
        if best["epoch"] < 0 or score > best["srcc"]:
            best = {"epoch": epoch, "srcc": score, "metrics": metrics}
            save_model(out / "best.safetensors", model.state_dict(), model_cfg)
        with open(out / "log.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        _checkpoint(last, model, optimizer, scaler, epoch, best)
        progress(record)
    save_model(out / "final.safetensors", model.state_dict(), model_cfg)
    (out / "best.json").write_text(json.dumps(best, indent=1) + "\n")
    return best


def pretrain(cfg: TrainConfig, pairs: list[Sample], images: Path, out: Path, clip: Optional[Path] = None,
             min_similarity: Optional[float] = None, progress: Callable[[dict], None] = lambda r: None) -> Path:
    """Image2Prompt: train the image encoder so its embedding points at the frozen text tower's.

    Optionally keeps only pairs whose initial CLIP similarity exceeds ``min_similarity`` (the paper: 0.35).
    Writes ``image_encoder.safetensors`` (the ``visual.*`` tensors), which ``finetune --init`` loads.
    """
    device = resolve_device(cfg.device)
    model_cfg = cfg.model_config(("quality",))
    model = build_model(model_cfg, None, clip, cfg.seed).to(device)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("visual."))
    if min_similarity is not None:
        sims = _similarities(model, pairs, images, cfg, model_cfg, device)
        kept = [p for p, s in zip(pairs, sims) if s > min_similarity]
        log.info("CLIP-score filter %.2f kept %d of %d pairs", min_similarity, len(kept), len(pairs))
        progress({"filter": min_similarity, "kept": len(kept), "of": len(pairs)})
        pairs = kept
    if not pairs:
        raise IPIQAError("no (image, prompt) pairs left to pretrain on")
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                 weight_decay=cfg.weight_decay)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    out.mkdir(parents=True, exist_ok=True)
    for epoch in range(cfg.epochs):
        model.train()
        model.text.eval()
        losses = []
        for x, t, _ in _loader(pairs, images, cfg, model_cfg, True, epoch):
            with torch.no_grad():
                target = model.encode_text(t.to(device)).float()
            with torch.autocast(device.type, enabled=use_amp):
                _, emb = model.encode_image(x.to(device))
            loss = (1 - torch.nn.functional.cosine_similarity(emb.float(), target, dim=-1)).mean()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
        record = {"epoch": epoch, "cosine_loss": float(np.mean(losses))}
        with open(out / "log.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        progress(record)
    visual = {k: v for k, v in model.state_dict().items() if k.startswith("visual.")}
    return save_model(out / "image_encoder.safetensors", visual, model_cfg)


@torch.no_grad()
def _similarities(model, pairs, images, cfg, model_cfg, device) -> list[float]:
    model.eval()
    sims = []
    for x, t, _ in _loader(pairs, images, cfg, model_cfg, False, 0):
        _, emb = model.encode_image(x.to(device))
        sims += torch.nn.functional.cosine_similarity(emb, model.encode_text(t.to(device)), dim=-1).tolist()
    return sims


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
