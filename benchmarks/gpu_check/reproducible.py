"""Part: reproducible scores on the GPU (issue 28): one image scored alone and inside batches of 3, 8 and 33 among
other images, with ``Scorer(reproducible=True)`` (every engine call at ``GPU_ENGINE_BATCH``) and without (each
requested batch one call), and what the fixed batch costs at low load (engine-only, requested batch 1 / 4 / 8).

Judged: with the fixed batch the image's scores are bit-identical at every batch (the README's guarantee); without,
the largest difference is reported, not judged (cuDNN may pick other kernels per batch size, which is why the option
exists). The cost is a measurement: fixed / free images per second at the same requested batch.
"""
from __future__ import annotations

import numpy as np

from .context import Context
from .parts import FAIL, PASS, PartResult, progress
from .throughput import engine_rate

__all__ = ["part", "BATCHES", "COST_BATCHES"]

BATCHES = (1, 3, 8, 33)  # where the one image is scored (alone, then among others)
COST_BATCHES = (1, 4, 8)  # requested batches at low load


def _target_scores(scorer, images: np.ndarray, prompts: list[str]) -> list[np.ndarray]:
    """Row 0's scores when it is scored in a batch of each size in ``BATCHES`` (the other rows: other images)."""
    return [scorer.score_arrays(images[:n], prompts[:n])[0] for n in BATCHES]


def part(ctx: Context) -> PartResult:
    from ipiqa.runtime.scorer import Scorer

    s = ctx.settings
    rng = np.random.default_rng(28)
    n = max(BATCHES)
    images = rng.integers(0, 256, (n, s.resolution, s.resolution, 3), dtype=np.uint8)
    prompts = ["a red fox in the snow"] + [f"another prompt #{i % 5}" for i in range(1, n)]
    rows: list[dict] = []
    found: dict[bool, list[np.ndarray]] = {}
    rates: dict[tuple[bool, int], float] = {}
    for fixed in (True, False):
        scorer = Scorer(ctx.model_path, backend="torch", device=s.device, fp16=s.fp16, reproducible=fixed)
        try:
            engine_batch = scorer.backend.engine_batch
            found[fixed] = _target_scores(scorer, images, prompts)
            for batch in COST_BATCHES:
                rates[fixed, batch] = engine_rate(scorer, batch, s.resolution, s.min_seconds / 4)["images_per_s"]
        finally:
            scorer.close()
        alone = found[fixed][0]
        worst = max(float(np.max(np.abs(x - alone))) for x in found[fixed])
        rows.append({"check": f"{'fixed' if fixed else 'free'} engine batch ({engine_batch})",
                     "engine_batch": engine_batch, "max_abs_diff_vs_alone": worst,
                     "bit_identical": all(np.array_equal(x, alone) for x in found[fixed]), "batches": list(BATCHES)})
        progress(f"reproducible: {rows[-1]['check']}: max |d| vs alone {worst:.3g}")
    for batch in COST_BATCHES:
        rows.append({"check": f"cost at requested batch {batch}", "fixed_img_s": rates[True, batch],
                     "free_img_s": rates[False, batch], "fixed_over_free": rates[True, batch] / rates[False, batch]})
    fixed_row, free_row = rows[0], rows[1]
    ok = fixed_row["bit_identical"]
    cost = ", ".join(f"{r['fixed_over_free']:.2f}" for r in rows[2:])
    figure = (f"fixed batch {fixed_row['engine_batch']}: {'bit-identical' if ok else 'NOT bit-identical'} alone and "
              f"at batch {'/'.join(map(str, BATCHES[1:]))} (free: max |d| {free_row['max_abs_diff_vs_alone']:.3g}); "
              f"fixed / free img/s at requested batch {'/'.join(map(str, COST_BATCHES))}: {cost}")
    return PartResult("reproducible", PASS if ok else FAIL,
                      "the fixed engine batch gives bit-identical scores at every batch (README 'Reproducible scores'); "
                      "the cost is a measurement", figure, tuple(rows))
