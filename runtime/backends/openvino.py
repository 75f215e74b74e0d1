"""OpenVINO backend: the bundle's ONNX graphs on the CPU through OpenVINO, in FP32, BF16 or INT8.

Why a second CPU runtime: on CPUs with AMX or AVX512-BF16, OpenVINO runs the FP32 graphs with BF16
arithmetic (``INFERENCE_PRECISION_HINT=bf16``) at several times ONNX Runtime's FP32 speed, which ONNX
Runtime's CPU provider cannot do. What each precision runs:

- ``fp32``: every graph at f32 (set explicitly: OpenVINO's own default on BF16 CPUs is BF16);
- ``bf16``: the image and fusion graphs at BF16. Served only where the CPU has the flags (``ipiqa.runtime.cpu``)
  and the bundle records a passing BF16 gate (``ipiqa-export --bf16``); the compiled model's own precision is
  checked after compiling, so no silent FP32 fallback is served as BF16;
- ``int8``: OpenVINO's own INT8 image graph (NNCF's IR, ``onnx.int8.cpu.openvino.file``) where the export made
  and gated it, else the bundle's CPU INT8 QDQ graph through OpenVINO's int8 kernels; fusion at f32; served where
  the export gated one of them on OpenVINO (``onnx.int8.cpu.openvino``; ``Manifest.graph_path`` picks which).

The text graph (both): at BF16 only where its own per-prompt gate passed (``onnx.bf16_text``, ``ipiqa-export
--bf16-text``) and the CPU has BF16, else f32. The hint applies to a whole compiled graph, and the text graph
finds its [QA] row with a TopK over float token ids, which BF16 cannot represent near 49407 (the wrong row:
cosine 0.43 measured); so the backend moves that search onto int32 ids in the model it read
(``openvino_text``) before compiling it at BF16, and refuses BF16 for a graph it cannot rewrite.

Compiled models are cached (``CACHE_DIR``) beside the bundle in ``cache/openvino/`` (or ``cache_dir``, or
``$IPIQA_OPENVINO_CACHE``; a read-only bundle falls back to ``~/.cache/ipiqa/openvino``), so the second start
skips compilation. OpenVINO keys a blob by the graph's path and options, not its bytes: a re-export with new
weights at the same paths would import the old blob. So each graph compiles into a folder named by the SHA-256
of its files (``cache_key``: the manifest's record), and a stale blob can never be met. All the process's cores (``cpu.usable_cores``) run each call (``PERFORMANCE_HINT=LATENCY``); OpenVINO releases the GIL while
inferring, so the pipeline's decode threads overlap it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np

from ipiqa._optional import require
from ipiqa.bundle import Manifest, check_graph_metadata, embedded_config, sha256_file
from ipiqa.manifest import weights_file
from ipiqa.runtime.int8_serving import refuse_openvino_int8_here
from ipiqa.config import IPIQAConfig
from ipiqa.errors import IPIQAError
from ipiqa.runtime.cpu import bf16_refusal, usable_cores

from . import openvino_text
from .base import Backend

__all__ = ["OpenVinoBackend", "OPENVINO_PRECISIONS", "inference_precisions", "text_bf16_servable", "cache_folder",
           "cache_key"]

OPENVINO_PRECISIONS = ("fp32", "bf16", "int8")
_HINT = {"fp32": "f32", "bf16": "bf16"}


def inference_precisions(precision: str, bf16_text: bool = False) -> dict[str, str]:
    """Each graph's inference precision for a served ``precision``: the one table the backend, the BF16
    gates and the manifest's ``served`` record read. ``bf16_text``: the text graph's own BF16 gate passed and
    the CPU has BF16 (``text_bf16_servable``); it then runs BF16 beside the bf16 and int8 sets."""
    if precision not in OPENVINO_PRECISIONS:
        raise IPIQAError(f"unknown openvino precision {precision!r}; choose from {', '.join(OPENVINO_PRECISIONS)}")
    low = "bf16" if precision == "bf16" else "fp32"
    text = "bf16" if bf16_text and precision in ("bf16", "int8") else "fp32"
    return {"image_encoder": low, "text_encoder": text, "fusion": low}


def text_bf16_servable(manifest: Manifest) -> bool:
    """The bundle's text graph passed its BF16 gate (``onnx.bf16_text``) and this CPU has BF16."""
    return manifest.bf16_text_passed and bf16_refusal() is None


def cache_folder(root: Optional[Path], override: Union[str, Path, None] = None) -> Optional[Path]:
    """Where compiled models are cached: ``override``, ``$IPIQA_OPENVINO_CACHE``, the bundle's ``cache/openvino``
    when writable, else the user's cache folder. ``""`` (either way): no cache."""
    chosen = override if override is not None else os.environ.get("IPIQA_OPENVINO_CACHE")
    if chosen is not None:
        return Path(chosen) if str(chosen) else None
    if root is not None:
        folder = Path(root) / "cache" / "openvino"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            pass
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ipiqa" / "openvino"


def cache_key(graph: Path, recorded: Optional[Mapping[str, str]] = None, root: Optional[Path] = None) -> str:
    """The cache folder of one graph, ``<stem>-<16 hex>``: SHA-256 over the SHA-256 of the graph file and of its
    external data files (``graph.onnx.data``); ``recorded``: the manifest's ``files`` (relative to ``root``),
    else the files are hashed here."""
    if recorded is not None and root is not None:
        rel = Path(graph).relative_to(root).as_posix()
        parts = sorted((k, v) for k, v in recorded.items() if k in (rel, weights_file(rel)))
    else:
        graph = Path(graph)
        weights = graph.parent / weights_file(graph.name)
        parts = [(p.name, sha256_file(p)) for p in [graph, *([weights] if weights.is_file() else [])]]
    digest = hashlib.sha256("\n".join(f"{k} {v}" for k, v in parts).encode()).hexdigest()
    return f"{Path(graph).stem}-{digest[:16]}"


def _core():
    ov = require("openvino", extra="openvino")
    return ov.Core()


def _metadata(model) -> dict[str, str]:
    """The ONNX graph's metadata_props, as OpenVINO's ONNX reader keeps them (rt_info ``framework``)."""
    try:
        framework = model.get_rt_info()["framework"]
    except (KeyError, RuntimeError):
        return {}
    keys = framework.keys() if isinstance(framework, Mapping) else ()
    return {k: model.get_rt_info(["framework", k]).astype(str) for k in keys}


def _input_shapes(model) -> dict[str, list]:
    return {i.get_any_name(): [d.get_length() if d.is_static else None for d in i.get_partial_shape()]
            for i in model.inputs}


class OpenVinoBackend(Backend):
    """The bundle's graphs on OpenVINO's CPU plugin; ``name``: ``openvino-cpu``, ``openvino-cpu-bf16``,
    ``openvino-cpu-int8``."""

    name = "openvino"

    def __init__(self, manifest: Optional[Manifest] = None, precision: str = "fp32", threads: Optional[int] = None,
                 cache_dir: Union[str, Path, None] = None, *, graphs: Optional[Mapping[str, Path]] = None,
                 served: Optional[Mapping[str, str]] = None):
        """``manifest``: the bundle's graphs for ``precision``, checked against the manifest (what the runtime
        serves). ``graphs`` instead: files no manifest lists yet (``from_graphs``, where ``served`` is described)."""
        if (manifest is None) == (graphs is None):
            raise IPIQAError("OpenVinoBackend takes a bundle's manifest or graph files (OpenVinoBackend.from_graphs), "
                             "one of them")
        if graphs is not None:
            cache = cache_folder(None, cache_dir)
            keys = {name: cache_key(Path(path)) for name, path in graphs.items()} if cache is not None else {}
            self._open(None, graphs, precision, dict(served or inference_precisions(precision)), threads, cache, keys)
            return
        served = inference_precisions(precision, text_bf16_servable(manifest))  # refuses an unknown precision
        if precision == "bf16":
            reason = bf16_refusal()
            if reason:
                raise IPIQAError(f"--precision bf16: {reason}")
        # bf16 without a passing gate record: the manifest's refusal names ``ipiqa-export --bf16``
        if precision == "int8" and "int8" in manifest.onnx_precisions and not manifest.onnx.int8["cpu"].openvino_passed:
            raise IPIQAError(f"{manifest.root}: the bundle's INT8 graph has no passing OpenVINO gate record (exported "
                             "without ipiqa[openvino], or OpenVINO's int8 kernels missed the INT8 bounds); re-export "
                             "with openvino installed, or serve INT8 with --backend onnxruntime")
        if precision == "int8":
            refuse_openvino_int8_here(manifest)
        paths = {name: manifest.graph_path(name, precision, runtime="openvino") for name in manifest.onnx.graphs}
        keys = {name: cache_key(path, manifest.files, manifest.root) for name, path in paths.items()}
        self._open(manifest.config, paths, precision, served, threads, cache_folder(manifest.root, cache_dir), keys,
                   check=lambda name, model: check_graph_metadata(manifest, name, _metadata(model),
                                                                  _input_shapes(model), precision, runtime="openvino"))

    @classmethod
    def from_graphs(cls, graphs: Mapping[str, Path], precision: str = "fp32",
                    served: Optional[Mapping[str, str]] = None, threads: Optional[int] = None,
                    cache_dir: Union[str, Path, None] = "") -> "OpenVinoBackend":
        """The BF16 and OpenVINO INT8 gates' backend: graph files no manifest lists yet (config read from the
        graphs). ``served``: each graph's inference precision (default ``inference_precisions``; the tests show
        the gate catches the text graph at BF16 through it). No compile cache by default."""
        return cls(graphs=graphs, precision=precision, threads=threads, cache_dir=cache_dir, served=served)

    def _open(self, cfg: Optional[IPIQAConfig], graphs: Mapping[str, Path], precision: str,
              served: Mapping[str, str], threads: Optional[int], cache: Optional[Path], keys: Mapping[str, str],
              check: Callable[[str, Any], None] = lambda name, model: None) -> None:
        core = _core()
        self.precision = precision
        self.served = dict(served)
        self.name = ("openvino-cpu" + ("" if precision == "fp32" else f"-{precision}")
                     + ("+text-bf16" if self.served.get("text_encoder") == "bf16" else ""))
        self.cache = cache
        self.models: dict[str, Any] = {}
        self.requests: dict[str, Any] = {}
        metadata = {}
        for name, path in graphs.items():
            model = core.read_model(str(path))
            check(name, model)
            metadata[name] = _metadata(model)
            config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _HINT[served[name]], "PERFORMANCE_HINT": "LATENCY",
                                      "INFERENCE_NUM_THREADS": int(threads or usable_cores())}
            if cache is not None:
                (cache / keys[name]).mkdir(parents=True, exist_ok=True)
                config["CACHE_DIR"] = str(cache / keys[name])
            if name == "text_encoder" and served[name] == "bf16":
                problem = openvino_text.integer_end_of_text(model)  # the module's, so a test may replace it
                if problem:
                    raise IPIQAError(f"{path}: the text graph cannot run at BF16 on OpenVINO ({problem}); serve it "
                                     "at FP32 (re-export without --bf16-text)")
                compiled = core.compile_model(model, "CPU", config)  # the rewritten model (cached by its hash)
            else:  # from the file path, so a second start imports the blob of these very bytes, not compiles
                compiled = core.compile_model(str(path), "CPU", config)
            hint = compiled.get_property("INFERENCE_PRECISION_HINT")
            got = getattr(hint, "get_type_name", lambda: str(hint))()
            if served[name] == "bf16" and got != "bf16":
                raise IPIQAError(f"{path}: OpenVINO compiled {name} at {got}, not bf16, on this CPU; "
                                 f"{bf16_refusal() or 'this OpenVINO build does not run BF16 here'}")
            self.models[name] = compiled
            self.requests[name] = compiled.create_infer_request()
        self.cfg = cfg if cfg is not None else embedded_config(metadata)
        # The text graph's sequence axis is dynamic (graph format 2): encode_text may cut each call at its end-of-text.
        self.takes_short_tokens = ("text_encoder" in self.models
                                   and not self.models["text_encoder"].inputs[0].get_partial_shape()[1].is_static)
        self._outputs = {name: [o.get_any_name() for o in m.outputs] for name, m in self.models.items()}
        self._inputs = {name: [i.get_any_name() for i in m.inputs] for name, m in self.models.items()}

    def _run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Outputs copied (share_outputs=False): a handle outlives the next call on the same request.
        result = self.requests[graph].infer({k: np.ascontiguousarray(feeds[k]) for k in self._inputs[graph]},
                                            share_inputs=True, share_outputs=False)
        return {name: np.asarray(result[port]) for name, port in zip(self._outputs[graph], self.models[graph].outputs)}

    def _encode_image(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return self._run("image_encoder", {"image": images})

    def _image_embedding(self, image_side: dict[str, np.ndarray]) -> np.ndarray:
        return image_side["image_embedding"]

    def _encode_text(self, tokens: np.ndarray) -> np.ndarray:
        return self._run("text_encoder", {"tokens": tokens})["text_embedding"]

    def _fusion_feeds(self, image_side: Mapping[str, np.ndarray], text: Optional[np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: v for k, v in image_side.items() if k in self._inputs["fusion"]}
        if text is not None:
            feeds["text_embedding"] = np.asarray(text, np.float32)
        return feeds

    def _fuse(self, image_side: dict[str, np.ndarray], text_embedding: Optional[np.ndarray]) -> np.ndarray:
        return self._run("fusion", self._fusion_feeds(image_side, text_embedding))["scores"]

    def image_outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self._check("image", images)
        return self._encode_image(np.ascontiguousarray(images))

    def fusion_outputs(self, image_side: Mapping[str, np.ndarray], text_embedding: Optional[np.ndarray]) -> dict[str, np.ndarray]:
        return self._run("fusion", self._fusion_feeds(image_side, text_embedding))

    def close(self) -> None:
        self.requests.clear()
        self.models.clear()
