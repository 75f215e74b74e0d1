"""The parity gate: the bundle, run through the runtime's own backends, against the PyTorch reference.

The gate drives exactly the objects that will score users' images (``OrtBackend`` on CPU for the ONNX
graphs, ``TrtBackend`` for engines), built from the manifest the export is about to write, so what
passes here is the code path a user runs. The reference is the straightforward (authors') computation
in FP32, and the same model in float64 on the same inputs measures the reference's own FP32 error: the
floor the tolerance rule in :mod:`.parity` builds on.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import numpy as np
import torch

from ipiqa.bundle import Manifest
from ipiqa.config import IPIQAConfig
from ipiqa.errors import IPIQAError
from ipiqa.manifest import io_shapes
from ipiqa.model import IPIQA, straightforward_pooling, normalize_pixels, tokenize

from .checks import ParityResult, ToleranceOverride
from .parity import compare

if TYPE_CHECKING:
    from ipiqa.runtime.backends import Backend

__all__ = ["PARITY_PROMPTS", "GateInputs", "gate_inputs", "onnx_parity", "engine_parity"]

PARITY_PROMPTS = (
    "",  # empty prompt: [SOT, EOT]
    "a photo of a cat wearing a tiny hat",
    " ".join(["highly detailed fantasy landscape with castles"] * 30),  # ~200 words: truncation at 77
    "日本の桜、水彩画 — café &amp; émoji 🎨",  # CJK, HTML entity, emoji
)


@dataclass(frozen=True)
class GateInputs:
    """One set of gate inputs, as the bundle's graphs take them and as the PyTorch model takes them.

    The image graph takes uint8 (B, R, R, 3) and normalizes inside; the model side gets the same pixels
    normalized by ``ipiqa.model.normalize_pixels``, so the graph's normalization is checked too.
    """

    image: np.ndarray  # the image graph's ``image`` input: uint8 (B, R, R, 3)
    tokens: np.ndarray  # the text graph's ``tokens`` input, int64 (B, context_length)
    model_images: torch.Tensor  # the same images as ``IPIQA.encode_image`` takes them

    @property
    def model_tokens(self) -> torch.Tensor:
        return torch.from_numpy(self.tokens)

    def slice(self, start: int, stop: int) -> "GateInputs":
        return GateInputs(self.image[start:stop], self.tokens[start:stop], self.model_images[start:stop])


def gate_inputs(cfg: IPIQAConfig, n: int, seed: int = 0) -> GateInputs:
    """Seeded uint8 images (every value 0..255 occurs) and tokens cycling through the adversarial prompts."""
    shape, dtype = io_shapes(cfg)["image"]
    image = np.random.default_rng(seed).integers(0, 256, (n, *shape[1:]), dtype=dtype)
    prompts = [PARITY_PROMPTS[i % len(PARITY_PROMPTS)] + ("" if i < len(PARITY_PROMPTS) else f" {i}") for i in range(n)]
    return GateInputs(image, tokenize(prompts, cfg.context_length).numpy(), normalize_pixels(torch.from_numpy(image)))


@dataclass
class _Reference:
    """One reference output in FP32 and in float64 (the floor is their difference)."""

    fp32: np.ndarray
    fp64: np.ndarray


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


@contextmanager
def _no_tf32() -> Iterator[None]:
    """The FP32 reference in true FP32: cuDNN convolutions default to TF32 on Ampere and later GPUs."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@torch.no_grad()
def _references(model: IPIQA, model64: IPIQA, x: GateInputs, device: str) -> dict[str, _Reference]:
    """Every checked tensor, in FP32 and float64. Fusion's float64 run gets the FP32 intermediates the graph
    gets, so its floor is the fusion step's own error; end to end runs float64 throughout."""
    images, tokens = x.model_images.to(device), x.model_tokens.to(device)
    text_on = model.cfg.text
    with straightforward_pooling(model), straightforward_pooling(model64), _no_tf32():
        fmap, emb = model.encode_image(images)
        text = model.encode_text(tokens) if text_on else None
        scores = model.fuse(fmap, emb, text)
        fmap64, emb64 = model64.encode_image(images.double())
        text64 = model64.encode_text(tokens) if text_on else None
        fused64 = model64.fuse(fmap.double(), emb.double(), text.double() if text_on else None)
        e2e64 = model64.fuse(fmap64, emb64, text64)
        if text_on:  # the cross pool alone: through a random head a wrong pool barely moves the scores
            pooled = model.txt_attnpool(fmap, text, False)
            pooled64 = model64.txt_attnpool(fmap.double(), text.double(), False)
    out = {"feature_map": _Reference(_np(fmap), _np(fmap64)), "image_embedding": _Reference(_np(emb), _np(emb64)),
           "fusion": _Reference(_np(scores), _np(fused64)), "end_to_end": _Reference(_np(scores), _np(e2e64))}
    if text_on:
        out["text_embedding"] = _Reference(_np(text), _np(text64))
        out["pooled"] = _Reference(_np(pooled), _np(pooled64))
    return out


def _float64_copy(model: IPIQA) -> IPIQA:
    """The same weights in float64: the model itself is left as the caller has it."""
    return copy.deepcopy(model).double().eval()


def _relative(name: str, ref: _Reference, out: np.ndarray, override: Optional[ToleranceOverride]) -> ParityResult:
    """``compare`` in units of the reference's largest magnitude: 1e-4 of the tensor's own scale.

    The fixed rule is ``1e-4 x max(1, scale)``, absolute for tensors smaller than 1: the tiny model's cross
    pool peaks at 0.1, and an untrained pool attends almost uniformly, so a rolled position table moves it
    by 7e-5 (7e-4 of its scale) and would pass. Dividing by the scale keeps the floor and the rule as they
    are and makes the check relative (a wrong graph on any model misses by orders of magnitude more).
    """
    scale = float(np.abs(ref.fp32).max(initial=0.0)) or 1.0
    return compare(f"{name} (relative)", ref.fp32 / scale, np.asarray(out) / scale,
                   ref64=ref.fp64 / scale, override=override)


def onnx_parity(model: IPIQA, manifest: Manifest, n: int = 4,
                override: Optional[ToleranceOverride] = None) -> list[ParityResult]:
    """The ONNX graphs through the runtime's ``OrtBackend`` (CPU): each graph, then the three composed.

    Fusion is checked on both its outputs: ``scores`` and the cross pool's ``pooled`` (which the runtime
    never reads, but a wrong pool hides behind an untrained head's nearly constant scores)."""
    from ipiqa.runtime.backends.ort import OrtBackend

    model = model.eval()
    x = gate_inputs(model.cfg, n)
    ref = _references(model, _float64_copy(model), x, "cpu")
    backend = OrtBackend(manifest, "cpu")
    try:
        image_side = backend.image_outputs(x.image)
        results = [compare("image_encoder/feature_map", ref["feature_map"].fp32, image_side["feature_map"],
                           ref64=ref["feature_map"].fp64, override=override),
                   compare("image_encoder/image_embedding", ref["image_embedding"].fp32, image_side["image_embedding"],
                           ref64=ref["image_embedding"].fp64, override=override)]
        feeds, text, text_ref = {"image_embedding": ref["image_embedding"].fp32}, None, None
        if model.cfg.text:
            text = backend.encode_text(x.tokens)
            results.append(compare("text_encoder/text_embedding", ref["text_embedding"].fp32, text,
                                   ref64=ref["text_embedding"].fp64, override=override))
            feeds["feature_map"], text_ref = ref["feature_map"].fp32, ref["text_embedding"].fp32
        fused = backend.fusion_outputs(feeds, text_ref)  # every fusion output, the gate-only ``pooled`` too
        if model.cfg.text:
            results.append(_relative("fusion/pooled", ref["pooled"], fused["pooled"], override))
        results.append(compare("fusion/scores", ref["fusion"].fp32, fused["scores"], scores=True,
                               ref64=ref["fusion"].fp64, override=override))
        results.append(compare("end_to_end/scores", ref["end_to_end"].fp32, backend.score(x.image, text),
                               scores=True, ref64=ref["end_to_end"].fp64, override=override))
    finally:
        backend.close()
    return results


def _engine_spans(n: int, batch: int) -> list[tuple[int, int]]:
    """The gate's chunks: one single row first (below the engines' MIN whenever MIN > 1, so the backend's
    padding is what the gate checks), then chunks of ``batch`` (above MAX they are split by the backend)."""
    spans, start = [(0, min(1, n))], min(1, n)
    while start < n:
        spans.append((start, min(start + batch, n)))
        start += batch
    return [s for s in spans if s[1] > s[0]]


def engine_parity(model: IPIQA, manifest: Manifest, n: int = 64, batch: int = 16,
                  override: Optional[ToleranceOverride] = None, backend: Optional["Backend"] = None,
                  device: str = "cuda", held_out: Optional[tuple[np.ndarray, Optional[np.ndarray]]] = None,
                  columns: Sequence[str] = ()) -> list:
    """The engines through the runtime's ``TrtBackend`` (``encode_text``, ``score``: the calls users run, padding
    and splitting included), against the FP32 reference on ``device`` (TF32 off).

    FP32 and FP16 engines: text embedding and end-to-end scores over about ``n`` generated inputs, held to the
    FP32 rule or the FP16 bounds. INT8 engines are judged like the CPU INT8 graph, by the INT8 bounds of
    ``export.checks``: on ``held_out`` (uint8 images, tokens) calibration images never calibrated on, the image
    embedding's cosine and each spread score column's Spearman (max |d| reported); the text engine (FP16)
    keeps the FP16 bounds. ``backend``: an already open runtime backend to check instead (it is closed here).
    """
    if manifest.engines is None:
        raise IPIQAError(f"{manifest.root}: the engine gate needs TensorRT engines; the manifest lists none")
    precision = manifest.engines.precision
    model = model.eval().to(device)
    model64 = _float64_copy(model)
    if precision == "int8":
        if held_out is None:
            raise IPIQAError("the INT8 engine gate runs on held-out calibration images (held_out=(images, tokens))")
        images, tokens = held_out
        if tokens is None:
            tokens = tokenize([""] * len(images), model.cfg.context_length).numpy()
        x = GateInputs(images, tokens, normalize_pixels(torch.from_numpy(images)))
        n = len(images)
    else:
        x = gate_inputs(model.cfg, n, seed=1)
    if backend is None:
        from ipiqa.runtime.backends.trt import TrtBackend

        backend = TrtBackend(manifest)
    keys = ("text_embedding", "end_to_end", "image_embedding")
    refs: dict[str, list[_Reference]] = {k: [] for k in keys}
    outs: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    try:
        for start, stop in _engine_spans(n, batch):
            chunk = x.slice(start, stop)
            ref = _references(model, model64, chunk, device)
            text = backend.encode_text(chunk.tokens) if model.cfg.text else None
            if text is not None:
                refs["text_embedding"].append(ref["text_embedding"])
                outs["text_embedding"].append(text)
            refs["end_to_end"].append(ref["end_to_end"])
            outs["end_to_end"].append(backend.score(chunk.image, text))
            if precision == "int8":
                refs["image_embedding"].append(ref["image_embedding"])
                outs["image_embedding"].append(backend.embed_images(chunk.image))
    finally:
        backend.close()
    joined = {k: (np.concatenate([r.fp32 for r in refs[k]]), np.concatenate([r.fp64 for r in refs[k]]),
                  np.concatenate(outs[k])) for k in keys if refs[k]}
    results: list = []
    if "text_embedding" in joined:
        ref32, ref64, out = joined["text_embedding"]
        results.append(compare(f"engines[{precision}]/text_embedding", ref32, out, fp16=precision != "fp32",
                               ref64=ref64, override=override))
    ref32, ref64, out = joined["end_to_end"]
    if precision == "int8":
        from .int8 import int8_checks

        results += int8_checks(f"engines[{precision}]", joined["image_embedding"][0], joined["image_embedding"][2],
                               ref32, out, columns)
    else:
        results.append(compare(f"engines[{precision}]/scores", ref32, out, scores=True, fp16=precision != "fp32",
                               ref64=ref64, override=override))
    return results
