"""Part 2: ``--decode device`` (nvJPEG + the exact resize on the GPU) against Pillow on the CPU.

200 generated JPEGs of odd sizes, 1 x 700 up to 4000 x 3000, RGB at three chroma subsamplings, progressive,
grayscale and CMYK. Per image: are the device-decoded pixels Pillow's, and is the device-resized image
Pillow's resize bit for bit. The claim (README, ``runtime/backends/torch_images.py``): the resize is exact
wherever the decoded pixels are equal; nvJPEG's own decode may differ by a few levels, and that is counted,
not judged. ``resize_exact`` on Pillow's decoded pixels is checked on every image too: the resize alone.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .context import Context
from .parts import PartResult, progress, status_of

__all__ = ["sizes", "make_odd_jpegs", "compare_image", "part"]

_CHUNK = 16  # images per batched nvJPEG call


def sizes(n: int, largest: tuple[int, int], seed: int = 0) -> list[tuple[int, int]]:
    """``n`` (width, height): the extremes (1 x 700, 700 x 1, the largest both ways, 1 x 1), then random odd
    sizes up to the largest, most of them not multiples of the JPEG block (8 or 16)."""
    w_max, h_max = largest
    fixed = [(1, min(700, h_max)), (min(700, w_max), 1), (w_max, h_max), (h_max, w_max), (1, 1), (17, 3)]
    rng = np.random.default_rng(seed)
    out = fixed[:n]
    while len(out) < n:
        w, h = int(rng.integers(1, w_max + 1)), int(rng.integers(1, h_max + 1))
        out.append((w | 1, h | 1))  # odd
    return out


def _one_jpeg(path: Path, size: tuple[int, int], i: int, seed: int) -> dict:
    from PIL import Image

    rng = np.random.default_rng(seed + i)
    w, h = size
    coarse = rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    tile = rng.normal(0.0, 8.0, (min(h, 251), min(w, 251), 3)).astype(np.int16)  # grain, tiled: cheap at 4000 px
    grain = np.tile(tile, (-(-h // tile.shape[0]), -(-w // tile.shape[1]), 1))[:h, :w]
    pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)
    mode = "L" if i % 10 == 3 else "CMYK" if i % 10 == 7 else "RGB"
    img = Image.fromarray(pixels).convert(mode)
    subsampling, progressive, quality = i % 3, i % 7 == 0, (75, 90, 95)[i % 3]
    options = {"quality": quality, "progressive": progressive}
    if mode == "RGB":
        options["subsampling"] = subsampling  # 0: 4:4:4, 1: 4:2:2, 2: 4:2:0
    img.save(path, "JPEG", **options)
    return {"file": path.name, "width": w, "height": h, "mode": mode, "quality": quality, "progressive": progressive,
            "subsampling": ("4:4:4", "4:2:2", "4:2:0")[subsampling] if mode == "RGB" else None}


def make_odd_jpegs(folder: Path, n: int, largest: tuple[int, int], seed: int = 0, workers: int = 1) -> list[dict]:
    """The generated JPEGs (written in threads: Pillow releases the GIL while encoding) and what each is."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"odd-{i:03d}-{w}x{h}.jpg", (w, h), i) for i, (w, h) in enumerate(sizes(n, largest, seed))]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(lambda job: {**_one_jpeg(*job, seed), "path": str(job[0])}, jobs))


def _pillow(path: str, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's decoded RGB pixels (3, H, W) as the device path's fallback decodes them, and the host path's
    resized image (R, R, 3): ``ipiqa.runtime.pipeline.load_input``, what ``--decode host`` scores."""
    from ipiqa.preprocess import decode_bytes, read_regular_file, to_rgb
    from ipiqa.runtime.pipeline import load_input

    decoded = np.array(to_rgb(decode_bytes(read_regular_file(path), path))).transpose(2, 0, 1)
    return decoded, np.asarray(load_input(path, resolution))


def compare_image(device_decoded: np.ndarray, device_resized: np.ndarray, exact_resized: np.ndarray,
                  pillow_decoded: np.ndarray, pillow_resized: np.ndarray) -> dict:
    """One image's figures: decode equal (and its level difference), device resize equal, resize_exact equal."""
    same_shape = device_decoded.shape == pillow_decoded.shape
    decode_diff = (np.abs(device_decoded.astype(np.int16) - pillow_decoded.astype(np.int16)) if same_shape else None)
    resize_diff = np.abs(device_resized.astype(np.int16) - pillow_resized.astype(np.int16))
    return {"decode_equal": bool(same_shape and not decode_diff.any()),
            "decode_max_levels": None if decode_diff is None else int(decode_diff.max(initial=0)),
            "decode_mean_levels": None if decode_diff is None else float(decode_diff.mean()),
            "resize_equal": bool(not resize_diff.any()), "resize_max_levels": int(resize_diff.max(initial=0)),
            "exact_resize_equal": bool(np.array_equal(exact_resized, pillow_resized))}


def part(ctx: Context) -> PartResult:
    import torch

    from ipiqa.runtime.backends.torch_images import decode_jpegs, resize_decoded, resize_exact

    s = ctx.settings
    r = s.resolution
    device = torch.device(s.device)
    progress(f"decode: generating {s.decode_images} JPEGs up to {s.decode_max_size[0]}x{s.decode_max_size[1]}")
    images = make_odd_jpegs(s.workdir / "odd-jpegs", s.decode_images, s.decode_max_size, workers=s.workers)
    rows: list[dict] = []
    pool = ThreadPoolExecutor(s.workers)
    for start in range(0, len(images), _CHUNK):  # one chunk's pixels in memory at a time
        chunk = images[start:start + _CHUNK]
        pillow = list(pool.map(lambda im: _pillow(im["path"], r), chunk))
        decoded = decode_jpegs([im["path"] for im in chunk], device)
        resized, errors = resize_decoded(decoded, r, device)
        for k, im in enumerate(chunk):
            pil_decoded, pil_resized = pillow[k]
            if errors[k] is not None:
                rows.append({**im, "error": str(errors[k]), "decode_equal": False, "resize_equal": False,
                             "exact_resize_equal": False})
                continue
            exact = resize_exact(torch.from_numpy(pil_decoded).to(device), r)
            figures = compare_image(decoded[k].cpu().numpy(), resized[k].permute(1, 2, 0).cpu().numpy(),
                                    exact.permute(1, 2, 0).cpu().numpy(), pil_decoded, pil_resized)
            rows.append({**{k2: v for k2, v in im.items() if k2 != "path"}, **figures})
        progress(f"decode: {min(start + _CHUNK, len(images))}/{len(images)} compared")
    pool.shutdown()
    return _result(rows, s.device)


def _result(rows: list[dict], device: str) -> PartResult:
    n = len(rows)
    equal = [x for x in rows if x["decode_equal"]]
    differs = [x for x in rows if not x["decode_equal"] and "error" not in x]
    errors = [x for x in rows if "error" in x]
    resize_ok = [x["resize_equal"] for x in equal]
    exact_ok = [x["exact_resize_equal"] for x in rows if "error" not in x]
    by_mode: dict[str, list[int]] = {}
    for x in rows:
        counts = by_mode.setdefault(x["mode"], [0, 0])
        counts[0] += 1
        counts[1] += bool(x["decode_equal"])
    levels = [x["decode_max_levels"] for x in differs if x["decode_max_levels"] is not None]
    figure = (f"decoded pixels equal on {len(equal)}/{n}; device resize bit-equal on {sum(resize_ok)}/{len(equal)} of "
              f"those; nvJPEG decode differs on {len(differs)} (max {max(levels, default=0)} levels"
              + (f", {sum(not x['resize_equal'] for x in differs)} of them resize to other pixels" if differs else "")
              + f"); resize_exact of Pillow's pixels bit-equal on {sum(exact_ok)}/{len(exact_ok)}"
              + (f"; {len(errors)} errors" if errors else ""))
    notes = [f"{mode}: decode equal on {eq}/{total}" for mode, (total, eq) in sorted(by_mode.items())]
    if device != "cuda":
        notes.append("CPU device: every image goes through Pillow, so decode equality is trivial here")
    return PartResult("decode", status_of([*resize_ok, *exact_ok, not errors]),
                      "bit-equal resized pixels wherever the decoded pixels equal Pillow's, and resize_exact of "
                      "Pillow's pixels bit-equal on every image; nvJPEG's own decode differences are counted, not judged",
                      figure, tuple(rows), tuple(notes))
