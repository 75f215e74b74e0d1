"""``Scorer``: a bundle (or a model file) behind one object that scores images against prompts.

    with Scorer("bundle/") as scorer:
        records = scorer.score(["a.jpg", "b.png"], ["a red fox", "a red fox"])
        summary = scorer.score_files("images.csv", output="scores.csv", resume=True)
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from dataclasses import replace
from collections.abc import Sized
from itertools import repeat
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image

from ipiqa.bundle import Manifest, read_bundle, rebuild_command
from ipiqa.config import IPIQAConfig
from ipiqa.device import Device, parse_device
from ipiqa.errors import IPIQAError

from .backends import Backend
from .cache import PromptCache
from .io import RowSource, writable_rows
from .io.provenance import Provenance, bundle_sha256, file_sha256, machine_name
from .io.run_output import open_output
from .pipeline import RunSummary, iter_results, score_rows
from .rows import Result, Row, clean_prompt
from .tokenizer import ClipTokenizer

__all__ = ["Scorer", "BACKENDS", "SCORER_PRECISIONS", "select_backend"]
log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnxruntime", "openvino", "torch")
SCORER_PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
ImageInput = Union[str, Path, Image.Image, np.ndarray]


def _ort_gpu_provider() -> Optional[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    for provider, name in (("tensorrt", "TensorrtExecutionProvider"), ("cuda", "CUDAExecutionProvider")):
        if name in available:
            return provider
    return None


def _tensorrt_usable(manifest: Manifest) -> bool:
    import importlib.util

    return manifest.engines is not None and importlib.util.find_spec("tensorrt") is not None


def _engine_precision_refused(manifest: Manifest, precision: str) -> IPIQAError:
    return IPIQAError(f"{manifest.root}: the TensorRT engines are {manifest.engine_precision}, not {precision}; "
                      f"rebuild them with: {rebuild_command(precision, engines=True)} (or --precision auto)")


def select_backend(manifest: Manifest, backend: str = "auto", device: Union[str, Device] = "auto",
                   precision: str = "auto") -> Backend:
    """The fastest usable backend for a bundle: TensorRT engines > ORT TensorRT/CUDA EP > on CPU, the fastest
    gated choice (``cpu_auto_choice``): OpenVINO BF16, or the INT8 image graph (on OpenVINO or ORT), else FP32 on ORT.

    ``precision``: ``auto`` serves what suits the device (CPU: as above; ORT GPU providers: the FP16 graphs
    when the bundle has them; TensorRT: the engines' precision; ``--backend openvino``: BF16 where servable,
    else FP32). ``bf16`` runs on OpenVINO. ``fp32``/``fp16``/``int8``
    ask for that precision and are refused, naming the rebuild command, where the bundle or the device
    cannot serve it. With ``backend`` and ``device`` auto, an explicit precision picks the first route
    that serves it (INT8 without INT8 engines: the CPU INT8 graph).
    """
    dev = parse_device(device)
    kind, index = dev.kind, dev.index
    if backend not in BACKENDS:
        raise IPIQAError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if precision not in SCORER_PRECISIONS:
        raise IPIQAError(f"unknown precision {precision!r}; choose from {', '.join(SCORER_PRECISIONS)}")
    if backend == "torch":
        raise IPIQAError(f"{manifest.root}: the torch backend runs a model file (.safetensors), not a bundle; "
                         "pass the model file, or use --backend onnxruntime/tensorrt for the bundle")
    if backend == "openvino" or (backend == "auto" and precision == "bf16"):
        if kind == "cuda":
            raise IPIQAError("the openvino backend runs on the CPU; use --device cpu (or --backend auto on GPU)")
        return _openvino_backend(manifest, precision)
    engines_serve = precision in ("auto", manifest.engine_precision)
    if backend == "tensorrt" or (backend == "auto" and kind != "cpu" and _tensorrt_usable(manifest) and engines_serve):
        if kind == "cpu":
            raise IPIQAError("the tensorrt backend needs --device cuda")
        if manifest.engine_precision is not None and not engines_serve:
            raise _engine_precision_refused(manifest, precision)
        from .backends.trt import TrtBackend
        return TrtBackend(manifest, index)
    from .backends.ort import CPU_FP16_REFUSED, OrtBackend

    provider = "cpu" if kind == "cpu" else _ort_gpu_provider()
    if provider is None and kind == "cuda":
        raise IPIQAError("--device cuda: no TensorRT and no GPU onnxruntime here; install 'ipiqa[gpu]' or "
                         "'ipiqa[tensorrt]', or use --device cpu")
    if provider is not None and provider != "cpu" and precision == "int8" and kind == "auto":
        provider = None  # device auto: INT8 without INT8 engines runs where the bundle's INT8 graph runs, the CPU
    provider = provider or "cpu"
    if precision == "auto" and provider == "cpu" and backend == "auto":
        runtime, precision = cpu_auto_choice(manifest)
        if runtime == "openvino":
            return _openvino_backend(manifest, precision)
    if precision == "auto":
        precision = "fp16" if provider != "cpu" and "fp16" in manifest.onnx_precisions else "fp32"
    elif precision == "fp16" and provider == "cpu":
        raise IPIQAError(CPU_FP16_REFUSED + ("" if kind == "cpu" else " (no GPU onnxruntime provider here)"))
    if precision not in manifest.onnx_precisions:
        raise manifest.missing_precision(precision)
    return OrtBackend(manifest, provider, index, precision=precision)


def _bf16_servable(manifest: Manifest) -> bool:
    """BF16 is the CPU's fastest gated choice where the bundle records its gate, the CPU has BF16 and
    OpenVINO is installed."""
    import importlib.util

    from .cpu import bf16_refusal

    return ("bf16" in manifest.onnx_precisions and bf16_refusal() is None
            and importlib.util.find_spec("openvino") is not None)


def cpu_auto_choice(manifest: Manifest) -> tuple[str, str]:
    """(runtime, precision): the fastest gated CPU choice for this bundle on this CPU, the one rule behind
    ``--precision auto`` on CPU. Only gated choices: BF16 needs the bundle's BF16 gate record, INT8 on OpenVINO
    its OpenVINO INT8 gate record (both written by an export with ``ipiqa[openvino]`` installed).

    Measured (``benchmarks/results``, RN50-512, batch 4, ratios to ONNX Runtime FP32 in one run): on an AMX Xeon,
    OpenVINO BF16 5.15x, INT8 1.3-1.85x, so BF16 first; on AMD Zen 4 (AVX512-BF16 and VNNI, no AMX), ONNX
    Runtime INT8 2.44x, OpenVINO INT8 2.99x, OpenVINO BF16 2.03x, so INT8 first, on OpenVINO where the CPU has
    VNNI or AMX (its int8 kernels need them; without, ONNX Runtime's reduce_range graph is the measured one).
    An INT8 image graph this CPU would compute otherwise than its gate did (full-range weights without INT8 dot
    products, ``int8_serving``) is never picked. FP32 stays on ONNX Runtime (OpenVINO FP32 0.95x on the AMX
    machine)."""
    import importlib.util

    from .cpu import cpu_flags, int8_dot_flags
    from .int8_serving import image_int8_refusal

    flags = cpu_flags()
    have_ov = importlib.util.find_spec("openvino") is not None
    bf16 = _bf16_servable(manifest)
    int8 = "int8" in manifest.onnx_precisions and image_int8_refusal(manifest) is None
    if bf16 and ("amx_bf16" in flags or not int8):
        return "openvino", "bf16"
    if int8:
        entry = manifest.onnx.int8["cpu"]
        fast_ov = have_ov and entry.openvino_passed and bool(int8_dot_flags(flags))
        return ("openvino" if fast_ov else "onnxruntime"), "int8"
    return "onnxruntime", "fp32"


def _openvino_backend(manifest: Manifest, precision: str) -> Backend:
    from .backends.openvino import OpenVinoBackend

    if precision == "fp16":
        raise IPIQAError("FP16 graphs are for GPUs; the openvino backend serves fp32, bf16 or int8")
    if precision == "auto":
        precision = "bf16" if _bf16_servable(manifest) else "fp32"
    return OpenVinoBackend(manifest, precision)


_END = object()


def _api_rows(images: Iterable[ImageInput], prompts: Iterable[object]) -> Iterator[Row]:
    """Python API inputs as rows: a path is read like a manifest's; a PIL image or array rides in ``source``."""
    images, prompts = iter(images), iter(prompts)
    while True:
        image, prompt = next(images, _END), next(prompts, _END)
        if image is _END and prompt is _END:
            return
        if image is _END or prompt is _END:
            raise IPIQAError("images and prompts differ in length")
        if isinstance(image, (str, Path)):
            yield Row(str(image), clean_prompt(prompt))
        else:
            yield Row(f"<{type(image).__name__}>", clean_prompt(prompt), source=image)


def scorer_precision(precision: str, fp16: bool) -> str:
    """The one reading of ``fp16=True`` / ``--fp16``: an alias of precision ``fp16``, refused beside another."""
    if precision not in SCORER_PRECISIONS:
        raise IPIQAError(f"unknown precision {precision!r}; choose from {', '.join(SCORER_PRECISIONS)}")
    if fp16 and precision not in ("auto", "fp16"):
        raise IPIQAError(f"--fp16 means --precision fp16; it contradicts --precision {precision}: pass one of them")
    return "fp16" if fp16 else precision


class Scorer:
    """Scores (image, prompt) pairs with a bundle or a ``.safetensors`` model; text embeddings are cached."""

    def __init__(self, source: Union[str, Path], backend: str = "auto", device: Union[str, Device] = "auto",
                 cache_size: int = 16384, fp16: bool = False, compile: bool = False, precision: str = "auto",
                 reproducible: bool = False):
        """``precision``: ``auto`` | ``fp32`` | ``fp16`` | ``int8`` (see ``select_backend``); ``self.backend.name``
        says what runs, e.g. ``onnxruntime-cpu-int8``. ``fp16=True`` is ``precision="fp16"`` (``scorer_precision``).

        ``reproducible``: on a GPU, run every engine call at one fixed batch (``backends.base``), so a row's score
        never depends on how it was batched; on the CPU that is always so. ``self.backend.engine_batch`` says
        the size (None: free)."""
        source = Path(source)
        precision = scorer_precision(precision, fp16)
        if source.is_dir():
            self.manifest: Optional[Manifest] = read_bundle(source)
            self.cfg: IPIQAConfig = self.manifest.config
            self.tokenizer = ClipTokenizer(source / self.manifest.tokenizer.file, self.cfg.context_length)
            self.backend = select_backend(self.manifest, backend, device, precision)
        elif source.is_file():
            if backend not in ("auto", "torch"):
                raise IPIQAError(f"{source}: a model file runs on the torch backend; export a bundle for {backend} "
                                 "(ipiqa-export MODEL -o BUNDLE)")
            if precision == "int8":
                raise IPIQAError(f"{source}: INT8 runs from a bundle; export one with: "
                                 f"{rebuild_command('int8').replace('MODEL.safetensors', str(source))}")
            fp16 = precision == "fp16"
            from ipiqa._optional import require

            default_bpe = require("open_clip.tokenizer", extra="torch").default_bpe
            from .backends.pytorch import TorchBackend

            self.manifest = None
            torch_backend = TorchBackend(source, parse_device(device), fp16, compile)
            self.backend = torch_backend
            self.cfg = self.backend.cfg
            self.tokenizer = ClipTokenizer(default_bpe(), self.cfg.context_length)
        else:
            raise IPIQAError(f"{source}: no such bundle folder or model file")
        if reproducible:
            self.backend.make_reproducible()
        self._source = source
        self._digest: Optional[str] = None
        log.info("backend: %s (engine batch %s)", self.backend.name, self.backend.engine_batch or "free")
        self.cache = PromptCache(cache_size)

    @property
    def provenance(self) -> Provenance:
        """What this scorer's numbers are a function of (written beside every output ``score_files`` writes)."""
        from ipiqa import __version__

        if self._digest is None:  # a model file is hashed once, and only when an output is written
            self._digest = bundle_sha256(self._source) if self.manifest is not None else file_sha256(self._source)
        return Provenance(self._digest, self.backend.name, self.backend.precision, self.backend.engine_batch,
                          __version__, machine_name(self.backend))

    # -- what the pipeline needs
    @property
    def resolution(self) -> int:
        return self.cfg.resolution

    @property
    def needs_prompt(self) -> bool:
        return self.cfg.text

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.cfg.outputs

    def score_arrays(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """uint8 (B, R, R, 3) images + B prompts -> (B, N); the backend splits and pads to its engines' range."""
        text = self.cache.lookup(self.tokenizer(list(prompts)), self.backend.encode_text) if self.cfg.text else None
        return self.backend.score(images, text)

    # -- public API
    def iter_score(self, images: Iterable[ImageInput], prompts: Optional[Iterable[Optional[str]]] = None,
                   batch_size: int = 8, workers: int = 4) -> Iterator[dict]:
        """``score`` as a stream: records come out batch by batch, so an input of any length (a generator
        included) runs in memory bounded by ``batch_size``; images are decoded a bounded distance ahead."""
        if prompts is None:
            prompts = repeat(None)
        elif isinstance(images, Sized) and isinstance(prompts, Sized) and len(images) != len(prompts):
            raise IPIQAError(f"{len(images)} images but {len(prompts)} prompts")
        for results in iter_results(_api_rows(images, prompts), self, batch_size, workers):
            for result in results:  # the same per-row results as a file run
                values = result.scores if result.scores is not None else (None,) * len(self.outputs)
                yield {**dict(zip(self.outputs, values)), "error": result.error}

    def score(self, images: Iterable[ImageInput], prompts: Optional[Iterable[Optional[str]]] = None,
              batch_size: int = 8, workers: int = 4) -> list[dict]:
        """One record per image: ``{output: score, ...}`` plus ``error`` (None, or why it was not scored).

        Runs in batches of ``batch_size`` (the CLI's default), exactly as ``score_files`` does: the row rules
        are ``runtime.rows``'s, and a batch whose backend call fails marks only its own rows.
        """
        return list(self.iter_score(images, prompts, batch_size, workers))

    def score_files(self, source: Union[str, Path, Iterable[Row]], output: Union[str, Path] = "-",
                    prompt: Optional[str] = None, fmt: Optional[str] = None, batch_size: int = 8, workers: int = 4,
                    resume: bool = False, fail_fast: bool = False,
                    on_results: Callable[[list[Result]], None] = lambda r: None, decode: str = "host",
                    fast_decode: bool = False) -> RunSummary:
        """Stream a folder/manifest/rows through the model into ``output`` (flushed per batch).

        Memory stays flat whatever the number of rows; ``resume`` reads the existing output once. A second
        run on the same output file refuses to start (``OutputLock``). ``decode="device"``: the torch backend
        decodes JPEGs on its GPU (nvJPEG) and resizes there with Pillow's exact arithmetic. ``fast_decode``:
        the opt-in host fast path (JPEG DCT-scaled decode + reducing_gap; not exact, see README).
        """
        if decode not in ("host", "device"):
            raise IPIQAError(f"decode must be 'host' or 'device', got {decode!r}")
        device_decode = getattr(self.backend, "decode_on_device", None) if decode == "device" else None
        if decode == "device" and device_decode is None:
            raise IPIQAError(f"decode='device' needs the torch backend (a .safetensors model file); the "
                             f"{self.backend.name} backend decodes on the host")
        if decode == "device" and fast_decode:
            raise IPIQAError("fast_decode is a host decoding path; it does not combine with decode='device'")
        if isinstance(source, (str, Path)):
            source = RowSource(source, prompt)
        elif isinstance(source, RowSource) and prompt is not None:
            raise IPIQAError("a RowSource carries its own prompt: pass RowSource(..., prompt=TEXT), not prompt=")
        if isinstance(source, RowSource):  # shards, Parquet and options: RowSource(src, prompt_field=, image_column=)
            source.refuse_run(self.needs_prompt, output, decode == "device")
            rows: Iterator[Row] = iter(source)
        else:
            rows = writable_rows(source)
        start = time.perf_counter()
        with open_output(output, rows, self.outputs, fmt, resume, self.provenance) as (writer, skipped):
            def sink(results: list[Result]) -> None:
                writer.write(results)
                on_results(results)

            summary = score_rows(rows, self, batch_size, workers, sink, fail_fast, device_decode=device_decode,
                                 fast=fast_decode)
        return replace(summary, skipped=skipped, seconds=time.perf_counter() - start)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
