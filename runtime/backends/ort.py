"""ONNX Runtime backend: CPU, CUDA or TensorRT execution provider over one of the bundle's ONNX graph sets.

Graph sets (``precision``): ``fp32`` (the exported graphs), ``fp16`` (``fp16/``, for GPU providers) and
``int8`` (the CPU INT8 image graph with the FP32 fusion graph, and the INT8 text graph where the bundle records
its passing gate, ``onnx.int8_text``, else the FP32 one). Refused, naming the fix: FP16 on
the CPU provider, which has no FP16 kernels for the arithmetic ops and runs FP16 graphs through inserted
casts at 0.87x the FP32 speed (measured here); INT8 on a GPU provider (the INT8 graph is quantized for
CPUs; GPUs run INT8 as TensorRT engines); a set the bundle does not hold.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from ipiqa.bundle import PRECISIONS, Manifest, check_graph_metadata, embedded_config, rebuild_command
from ipiqa.config import IPIQAConfig
from ipiqa.errors import IPIQAError
from ipiqa.runtime.cpu import usable_cores
from ipiqa.runtime.int8_serving import refuse_int8_image_here, text_int8_servable

from .base import Backend

__all__ = ["OrtBackend", "ort_session", "PROVIDERS", "CPU_FP16_REFUSED", "GPU_INT8_REFUSED"]

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
CPU_FP16_REFUSED = ("FP16 graphs are for GPUs (ONNX Runtime CPU has no FP16 conv kernels and runs them at 0.87x FP32); "
                    "use fp32 or int8 on CPU")
BF16_ELSEWHERE = "bf16 runs on OpenVINO: --backend openvino (pip install 'ipiqa[openvino]'), on a CPU with AMX or AVX512-BF16"
GPU_INT8_REFUSED = ("the bundle's INT8 ONNX graph is quantized for CPUs (asymmetric uint8); on a GPU, INT8 runs as "
                    "TensorRT engines ({rebuild}, then --backend tensorrt); or score on --device cpu")


def ort_session(source: Union[str, Path, bytes], threads: Optional[int] = None, optimize: bool = True, fp16: bool = False,
                providers: Sequence[Any] = (PROVIDERS["cpu"],), quiet: bool = False):
    """The one ONNX Runtime session factory: the runtime's backend and every export gate load graphs here.

    ``source``: a graph file, or a serialized model with its weights inline. ``threads``: intra-op threads
    (None: the process's cores, ``cpu.usable_cores``; ONNX Runtime's own default counts the host's cores, 64
    threads on 2 in a container limited to 2 CPUs of a 64-core host), one op at a time (best for conv nets on
    CPU). ``optimize=False`` runs Q/DQ as written (fake quantization, what TensorRT's explicit quantization
    computes). ``fp16``: ONNX Runtime 1.32's NCHWc layout pass (``NchwcTransformer``, which re-lays FP32
    convolutions) crashes the process while loading FP16 graphs; they are loaded without it.

    Intra-op threads never spin (``session.intra_op.allow_spinning=0``). A backend holds three sessions, each with
    its own pool, called in turn; a pool that spin-waits after its call holds the cores the next session needs.
    Measured (RN50-512 INT8 bundle, batch 1, 2-core AMD EPYC Zen 4 shared with other jobs, paired timings, three
    rounds): image graph then fusion (``Scorer.score_arrays``, prompt cached) 5.4 / 3.6 / 8.4 img/s spinning,
    8.4 / 6.8 / 17.3 without; with a new prompt per image (text graph too) 2.9 / 1.8 / 3.4 against 6.3 / 5.7 /
    12.4; the image graph alone, called in a loop, 17.0 spinning against 16.9 without.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else
                                        ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = usable_cores() if threads is None else threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if quiet:
        options.log_severity_level = 3
    return ort.InferenceSession(source if isinstance(source, bytes) else str(source), options,
                                providers=list(providers), disabled_optimizers=["NchwcTransformer"] if fp16 else [])


class OrtBackend(Backend):
    """The bundle's graphs on one ONNX Runtime provider; ``name`` says provider and precision, e.g.
    ``onnxruntime-cpu`` (FP32), ``onnxruntime-cpu-int8`` (INT8 image graph, FP32 text graph),
    ``onnxruntime-cpu-int8+text-int8`` (the gated INT8 text graph too), ``onnxruntime-cuda-fp16``."""

    name = "onnxruntime"

    def __init__(self, manifest: Optional[Manifest] = None, provider: str = "cpu", device_id: int = 0,
                 threads: Optional[int] = None, precision: str = "fp32", *,
                 graphs: Optional[Mapping[str, Union[Path, bytes]]] = None, optimize: bool = True, fp16: bool = False):
        """``manifest``: the bundle's ``precision`` set on ``provider``, each graph checked against the manifest
        (what the runtime serves). ``graphs`` instead: a set no manifest lists, on the CPU provider
        (``from_graphs``, where the other keywords are described)."""
        if (manifest is None) == (graphs is None):
            raise IPIQAError("OrtBackend takes a bundle's manifest or a graph set (OrtBackend.from_graphs), one of them")
        if graphs is not None:
            self._open(None, graphs, "cpu", 0, precision, [PROVIDERS["cpu"]], threads, fp16=fp16, optimize=optimize,
                       quiet=True)
            return
        import onnxruntime as ort

        if provider not in PROVIDERS:
            raise IPIQAError(f"unknown onnxruntime provider {provider!r}; choose from {sorted(PROVIDERS)}")
        if precision == "bf16":
            raise IPIQAError(BF16_ELSEWHERE)
        if precision not in PRECISIONS:
            raise IPIQAError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
        if precision == "fp16" and provider == "cpu":
            raise IPIQAError(CPU_FP16_REFUSED)
        if precision == "int8" and provider != "cpu":
            raise IPIQAError(GPU_INT8_REFUSED.format(rebuild=rebuild_command("int8", engines=True)))
        available = ort.get_available_providers()
        if PROVIDERS[provider] not in available:
            raise IPIQAError(f"onnxruntime here has no {PROVIDERS[provider]} (available: {available}); "
                             "install onnxruntime-gpu (pip install 'ipiqa[gpu]') for cuda/tensorrt")
        if precision == "int8":
            refuse_int8_image_here(manifest)
        # int8 on the CPU: the INT8 text graph where its gate passed and it computes here as gated, else FP32.
        text_int8 = precision == "int8" and text_int8_servable(manifest)
        paths = {name: manifest.graph_path(name, precision, text_int8) for name in manifest.onnx.graphs}  # refuses
        providers: list[Any] = [PROVIDERS["cpu"]]
        if provider == "cuda":
            providers.insert(0, (PROVIDERS["cuda"], {"device_id": device_id}))
        elif provider == "tensorrt":
            cache = manifest.root / "engines" / f"ort-trt-cache-{precision}"
            # trt_fp16_enable stays off: precision comes from the graph's types (the fp16/ graphs keep their FP32
            # islands that way), and an fp32 request must not be run in FP16 behind the user's back.
            providers[:0] = [(PROVIDERS["tensorrt"], {"device_id": device_id, "trt_fp16_enable": False,
                                                      "trt_engine_cache_enable": True,
                                                      "trt_engine_cache_path": str(cache)}),
                             (PROVIDERS["cuda"], {"device_id": device_id})]
        self._open(manifest.config, paths, provider, device_id, precision, providers, threads, fp16=precision == "fp16",
                   check=lambda name, sess: check_graph_metadata(
                       manifest, name, sess.get_modelmeta().custom_metadata_map,
                       {i.name: i.shape for i in sess.get_inputs()}, precision, text_int8),
                   text_precision="int8" if text_int8 else "fp32")

    @classmethod
    def from_graphs(cls, graphs: Mapping[str, Union[Path, bytes]], label: str = "fp32", optimize: bool = True,
                    threads: Optional[int] = None, fp16: bool = False) -> "OrtBackend":
        """The gates' backend: a graph set on the CPU provider that no manifest lists yet (the manifest is
        written once every gate has passed), or that none ever will (the FP16 gate's emulation graphs).

        The same engine calls as the served backend; the config comes from the graphs themselves (each one
        embeds it, and they must agree). ``label``: what the set is, for the backend's name. ``optimize=False``
        runs Q/DQ as written (what TensorRT's explicit quantization computes). ``fp16``: the set holds FP16
        graphs (loaded without the layout pass that crashes on them, see ``ort_session``).
        """
        return cls(graphs=graphs, precision=label, threads=threads, optimize=optimize, fp16=fp16)

    def _open(self, cfg: Optional[IPIQAConfig], graphs: Mapping[str, Union[Path, bytes]], provider: str,
              device_id: int, precision: str, providers: Sequence[Any], threads: Optional[int], fp16: bool = False,
              optimize: bool = True, quiet: bool = False,
              check: Callable[[str, Any], None] = lambda name, sess: None, text_precision: str = "fp32") -> None:
        """Sessions for ``graphs``; ``cfg`` None: the config the graphs embed (refused when they disagree).
        ``text_precision``: the text graph's own (``int8``: the gated INT8 text graph, named in ``name``)."""
        self.gpu = provider != "cpu"
        self.device_id = device_id
        self.precision = precision
        self.text_precision = text_precision
        self.name = (f"onnxruntime-{provider}" + ("" if precision == "fp32" else f"-{precision}") +
                     ("+text-int8" if text_precision == "int8" else ""))
        self.sessions = {}
        for name, source in graphs.items():
            sess = ort_session(source, threads, optimize=optimize, fp16=fp16, providers=providers, quiet=quiet)
            check(name, sess)
            self.sessions[name] = sess
        self.cfg = cfg if cfg is not None else embedded_config(
            {name: sess.get_modelmeta().custom_metadata_map for name, sess in self.sessions.items()})
        self._image_names = [o.name for o in self.sessions["image_encoder"].get_outputs()]
        # A dynamic sequence axis (graph format 2) takes short text calls; not through ONNX Runtime's TensorRT
        # provider, which would build an engine for every new length.
        text = self.sessions.get("text_encoder")
        self.takes_short_tokens = (text is not None and provider != "tensorrt"
                                   and not isinstance(text.get_inputs()[0].shape[1], int))

    def _encode_image(self, images: np.ndarray) -> dict[str, Any]:
        sess = self.sessions["image_encoder"]
        if not self.gpu:
            return dict(zip(self._image_names, sess.run(None, {"image": images})))
        binding = sess.io_binding()  # outputs stay on the GPU as OrtValues; fusion binds them directly
        binding.bind_cpu_input("image", np.ascontiguousarray(images))
        for name in self._image_names:
            binding.bind_output(name, "cuda", self.device_id)
        sess.run_with_iobinding(binding)
        return dict(zip(self._image_names, binding.get_outputs()))

    def _image_embedding(self, image_side: dict[str, Any]) -> np.ndarray:
        value = image_side["image_embedding"]
        return value if isinstance(value, np.ndarray) else value.numpy()  # an OrtValue on the GPU

    def image_outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the image graph for a batch (the parity gate checks the feature map); CPU only."""
        if self.gpu:
            raise IPIQAError("image_outputs runs on the CPU provider (the parity gate's backend)")
        self._check("image", images)
        return self._encode_image(np.ascontiguousarray(images))

    def _encode_text(self, tokens: np.ndarray) -> np.ndarray:
        return self.sessions["text_encoder"].run(None, {"tokens": tokens})[0]

    def _fusion_feeds(self, image_side: dict[str, Any], text_embedding: Optional[np.ndarray]) -> dict[str, Any]:
        wanted = [i.name for i in self.sessions["fusion"].get_inputs()]
        feeds = {k: v for k, v in image_side.items() if k in wanted}
        if text_embedding is not None:
            feeds["text_embedding"] = np.ascontiguousarray(text_embedding, dtype=np.float32)
        return feeds

    def fusion_outputs(self, image_side: dict[str, Any], text_embedding: Optional[np.ndarray]) -> dict[str, np.ndarray]:
        """Every output of the fusion graph (the parity gate reads the gate-only ``pooled``); CPU only."""
        if self.gpu:
            raise IPIQAError("fusion_outputs runs on the CPU provider (the parity gate's backend)")
        sess = self.sessions["fusion"]
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, self._fusion_feeds(image_side, text_embedding))))

    def _fuse(self, image_side: dict[str, Any], text_embedding: Optional[np.ndarray]) -> np.ndarray:
        sess = self.sessions["fusion"]
        feeds = self._fusion_feeds(image_side, text_embedding)
        if not self.gpu:
            return sess.run(["scores"], feeds)[0]  # not the gate-only outputs
        binding = sess.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)  # text embeddings come from the host-side prompt cache (4 KB/row)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("scores")
        sess.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def close(self) -> None:
        self.sessions.clear()
