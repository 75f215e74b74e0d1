"""``ipiqa demo``: the whole path on a machine with no weights, no GPU and no network.

The model is the real architecture with seeded random weights: its scores are meaningless numbers that
only show the pipeline works. Real scores need trained weights (``ipiqa import-official``).

torch is imported only by ``demo_model``, so ``SMOKE_ARCH`` and ``write_samples`` cost no torch import.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from .config import IPIQAConfig

if TYPE_CHECKING:
    from .model import IPIQA

__all__ = ["demo_model", "write_samples", "SAMPLES", "SMOKE_ARCH"]

# The reduced-width architecture of CI smoke runs and tests: RN50's layout, widths small enough for a CPU.
SMOKE_ARCH = dict(vision_layers=(1, 1, 1, 1), vision_width=8, embed_dim=32, vision_heads=4, text_width=64,
                  text_layers=2, text_heads=2)

SAMPLES = (
    ("sunset.jpg", "a sunset over a calm sea, warm colors"),
    ("sunset_noisy.jpg", "a sunset over a calm sea, warm colors"),
    ("checkerboard.png", "a black and white checkerboard"),
    ("circles.png", "colorful circles on a dark background"),
    ("circles_blur.jpg", "colorful circles on a dark background"),
    ("noise.png", "a portrait of a cat, highly detailed"),
)


def demo_model(cfg: IPIQAConfig = IPIQAConfig(), seed: int = 0) -> IPIQA:
    """Seeded, UNTRAINED model. BatchNorm gets non-trivial statistics so different inputs differ visibly."""
    import torch

    from .model import IPIQA

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = IPIQA(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


def _draw(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size] / size
    if name.startswith("sunset"):
        arr = np.stack([0.9 - 0.3 * yy, 0.3 + 0.4 * (1 - yy) * xx, 0.2 + 0.6 * yy], -1)
        if "noisy" in name:
            arr = arr + rng.normal(0, 0.25, arr.shape)
        return Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8))
    if name.startswith("checker"):
        return Image.fromarray((((xx * 8).astype(int) + (yy * 8).astype(int)) % 2 * 255).astype(np.uint8)).convert("RGB")
    if name.startswith("circles"):
        img = Image.new("RGB", (size, size), (15, 15, 30))
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x, y, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(size // 20, size // 6))]
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.integers(60, 256, 3).tolist()))
        if "blur" in name:
            from PIL import ImageFilter
            img = img.filter(ImageFilter.GaussianBlur(size / 40))
        return img
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def write_samples(folder: Path, size: int = 384, seed: int = 0) -> Path:
    """Generated images + ``images.csv`` (image,prompt), with one deliberately truncated JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, _ in SAMPLES:
        _draw(name, size, rng).save(folder / name, quality=90)
    good = (folder / "sunset.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(good[: len(good) // 3])  # shows how a bad file is reported
    manifest = folder / "images.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "prompt"])
        w.writerows(SAMPLES)
        w.writerow(["broken.jpg", "a sunset over a calm sea, warm colors"])
    return manifest
