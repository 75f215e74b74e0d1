"""Pillow's 8-bit bicubic resize as two coefficient matrices, so a matmul can reproduce it bit for bit.

``Image.resize((W, H), BICUBIC)`` on an 8-bit image (Pillow's ``src/libImaging/Resample.c``) is separable:
a horizontal pass, then a vertical pass over the horizontally resampled, uint8-rounded intermediate. For
each output pixel ``precompute_coeffs`` takes the bicubic kernel (a = -0.5) with its support widened by
the downscale factor, the source window [xmin, xmax), and normalizes the weights to sum 1;
``normalize_coeffs_8bpc`` turns them into fixed-point integers with 22 fractional bits. A pass is then

    out = clip8((2**21 + sum_x pixel[x] * k[x]) >> 22)

in integer arithmetic. Here each pass is a dense (dst, src) matrix of those integers, stored in float64:
products and partial sums are integers below 2**53 (bound checked below), so a float64 matmul in any
summation order, on any device, gives the same integer sums as Pillow's loop. ``runtime.backends.
torch_images`` runs the matrices on a GPU; ``resize`` here is the numpy version (tests, reference).

Pillow only resamples the rows the vertical pass reads (its ``box`` crop); computing all rows is the same
arithmetic on the rows that matter. Pillow 13 (python-pillow/Pillow#9549) runs the vertical pass first
when the height shrinks much more than the width; ``vertical_first`` states that rule. The weights below use the same double-precision operations in the
same order as the C code (kernel polynomial, sequential weight sum), so the integers are identical.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import PIL

__all__ = ["PRECISION_BITS", "SUPPORT", "fixed_point_coefficients", "pass_matrix", "round_pass", "vertical_first",
           "resize"]

PRECISION_BITS = 32 - 8 - 2  # Pillow: 8 bits of result, 2 bits of headroom for negative lobes / overshoot
SUPPORT = 2.0  # the bicubic kernel is zero beyond |x| >= 2 (before widening for downscaling)
_A = -0.5  # Pillow's bicubic constant (module-level so a mutation test can show the equality test fails)
_HALF = float(1 << (PRECISION_BITS - 1))
_SCALE = float(1 << PRECISION_BITS)


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's ``bicubic_filter``, the same double operations in the same order."""
    a = _A
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def fixed_point_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's per-output-pixel window start ``xmin`` (out,) and integer weights (out, ksize), int64.

    Weight ``k[i, j]`` applies to source pixel ``xmin[i] + j``; trailing entries past the window are 0.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    # box = (0, 0, in_size, in_size) as C floats; in1 - in0 is exact for any image size Pillow accepts
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale  # in0 = 0: "0 + x" is exact
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's (int) truncates toward 0
    xmax = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    j = np.arange(ksize)
    inside = j[None, :] < xmax[:, None]
    w = _bicubic((j[None, :] + xmin[:, None] - center[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(inside, w, 0.0)
    ww = np.cumsum(w, axis=1)[:, -1]  # cumsum adds left to right, like the C loop (np.sum would pair up)
    w = np.where(ww[:, None] != 0.0, w / np.where(ww == 0.0, 1.0, ww)[:, None], w)
    # normalize_coeffs_8bpc: (int)(k * 2**22 +- 0.5), truncating toward zero
    k = np.trunc(np.where(w < 0, -0.5 + w * _SCALE, 0.5 + w * _SCALE)).astype(np.int64)
    return xmin, np.where(inside, k, 0)


@lru_cache(maxsize=16)  # up to 8 MB each (2048 -> 512); datasets of mixed sizes recompute in ~1 ms
def pass_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Dense (out_size, in_size) float64 matrix of Pillow's fixed-point weights for one pass (read-only).

    ``matrix @ pixels`` (pixels uint8 as float64) gives Pillow's integer sums exactly: every term is an
    integer and every partial sum stays below 255 * sum|k| < 2**53 (checked).
    """
    xmin, k = fixed_point_coefficients(in_size, out_size)
    dense = np.zeros((out_size, in_size), dtype=np.float64)
    rows, cols = np.nonzero(k)
    dense[rows, xmin[rows] + cols] = k[rows, cols]
    bound = 255 * np.abs(k).sum(axis=1).max() + _HALF
    if bound >= 2.0 ** 53:  # cannot happen for 22-bit weights; kept so a change of PRECISION_BITS cannot lie
        raise ValueError(f"fixed-point sums up to {bound:.3g} are not exact in float64")
    dense.setflags(write=False)
    return dense


def round_pass(sums: np.ndarray) -> np.ndarray:
    """Pillow's ``clip8``: add half, arithmetic shift right by 22 (floor), clip to 0..255 (float64 in/out)."""
    return np.clip(np.floor((sums + _HALF) * (1.0 / _SCALE)), 0.0, 255.0)


def vertical_first(in_size: tuple[int, int], out_size: tuple[int, int]) -> bool:
    """Whether the installed Pillow resamples rows (vertical pass) before columns for this (w, h) change.

    The order matters because the intermediate image is rounded to uint8. Pillow < 13: always
    horizontal first. Pillow 13 (PR #9549) goes vertical first when the height shrinks by more than
    twice as many pixels as the width: ``h > H and h - H > 2 * (w - W)``. That rule was inferred by
    probing Pillow 13.0.0 (every pass order it chose on 48,000 size combinations from 1 to 64 px and
    400 random ones up to 1500 px matched it); tests compare against Pillow itself, so a Pillow that
    changes it again fails them rather than drifting silently.
    """
    (w, h), (W, H) = in_size, out_size
    if int(PIL.__version__.split(".")[0]) < 13:
        return False
    return h > H and h - H > 2 * (w - W)


def resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W) or (H, W, C) -> uint8 (h, w[, C]) equal to Pillow's ``resize((w, h), BICUBIC)``.

    A reference in numpy (slow for large images: dense matmuls); Pillow itself is faster on CPU.
    """
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(f"resize takes uint8 (H, W[, C]) pixels, got {pixels.dtype} {pixels.shape}")
    w_out, h_out = size
    planes = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (C, H, W)
    x = planes.astype(np.float64)
    h_in, w_in = x.shape[1:]
    order = ("rows", "columns") if vertical_first((w_in, h_in), (w_out, h_out)) else ("columns", "rows")
    for which in order:  # Pillow skips a pass whose size is unchanged (it would be the identity anyway)
        if which == "columns" and w_out != w_in:
            x = round_pass(x @ pass_matrix(w_in, w_out).T)
        elif which == "rows" and h_out != h_in:
            x = round_pass(pass_matrix(h_in, h_out) @ x)
    out = x.astype(np.uint8)
    return out[0] if pixels.ndim == 2 else np.ascontiguousarray(out.transpose(1, 2, 0))
