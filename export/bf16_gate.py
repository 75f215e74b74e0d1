"""The BF16 gate: the FP32 graphs as OpenVINO serves them at BF16, against the same graphs in FP32.

Run through the runtime's own ``OpenVinoBackend`` (image and fusion graphs at BF16, the text graph at f32,
``runtime.backends.openvino.inference_precisions``) against the runtime's ``OrtBackend`` in FP32, on the FP16
gate's inputs (``gate_inputs(cfg, n, seed=1)``: every pixel value, the adversarial prompts). Bounds from
``checks.BOUNDS["bf16"]`` (why those numbers: its comment): scores within 5e-2 absolute and Spearman
>= 0.995 where they spread; every intermediate tensor of all three graphs (feature map, both embeddings, the
cross pool) at per-row cosine >= 0.999. The text embedding is checked because BF16 there reads the wrong
[QA] row (ArgMax over float token ids): an untrained model's scores hide it, its cosine (0.51) does not.
"""
from __future__ import annotations

from pathlib import Path
from typing import Collection, Mapping, Optional

import numpy as np

from ipiqa.runtime.backends.openvino import OpenVinoBackend

from .checks import BOUNDS, Check
from .graph_runs import graph_backend, run_graphs
from .measures import cosine_result, scores_spread, with_spread_note
from .parity import compare

__all__ = ["bf16_gate"]


def bf16_gate(fp32: Mapping[str, Path], images: np.ndarray, tokens: Optional[np.ndarray] = None,
              columns: Collection[str] = (), served: Optional[Mapping[str, str]] = None) -> list[Check]:
    """Every check of the BF16 gate; ``served``: per-graph inference precisions (default: as served)."""
    bounds = BOUNDS["bf16"]
    with graph_backend(fp32) as high, OpenVinoBackend.from_graphs(fp32, "bf16", served) as low_backend:
        ref, low = run_graphs(high, images, tokens), run_graphs(low_backend, images, tokens)
    ref_scores, low_scores = ref["scores"].reshape(len(images), -1), low["scores"].reshape(len(images), -1)
    names = list(columns) or [str(j) for j in range(ref_scores.shape[1])]
    results: list[Check] = []
    for j, spread in enumerate(scores_spread(ref_scores)):
        name = f"bf16/scores/{names[j]}" + ("" if spread else " (scores barely spread: rank not gated)")
        results.append(compare(name, ref_scores[:, j:j + 1], low_scores[:, j:j + 1], scores=bool(spread),
                               precision="bf16"))
    results += [with_spread_note(cosine_result(f"bf16/{k}", ref[k], low[k], float(bounds.cosine_min)), ref[k])
                for k in ref if k != "scores"]
    return results
