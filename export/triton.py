"""A Triton Inference Server model repository from a bundle.

    ipiqa_preprocess     python backend: image bytes + prompt -> uint8 resized image + token ids
    ipiqa_image_encoder  onnxruntime (or tensorrt) : image -> feature_map, image_embedding
    ipiqa_text_encoder   onnxruntime (or tensorrt) : tokens -> text_embedding
    ipiqa_fusion         onnxruntime (or tensorrt) : feature_map, image_embedding, text_embedding -> scores
    ipiqa                ensemble: IMAGE (bytes), PROMPT (string) -> SCORES

A client sends the raw image file and its prompt and gets the scores. The python model's code is
``ipiqa.runtime.serve.triton_model`` and the client's is ``ipiqa.runtime.serve.triton_client``; the repository holds
two-line shims that import them (see ``PREPROCESS_SHIM``). Triton cannot run on this project's machines:
the repository is validated structurally (configs parsed into Triton's ModelConfig message, names and
shapes checked against the ONNX graphs), and the python model and client are run against stand-ins.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from ipiqa.bundle import Manifest
from ipiqa.errors import IPIQAError
from ipiqa.manifest import io_shapes
from ipiqa.runtime.serve import contract  # the tensor names and the description ipiqa serve shares
from ipiqa.runtime.serve import triton_client, triton_model  # torch-free: they run beside the runtime

__all__ = ["write_triton_repository", "MODEL_NAMES", "SERVED_OUTPUTS", "PREPROCESS_SHIM", "CLIENT_SHIM"]

MODEL_NAMES = {"image_encoder": "ipiqa_image_encoder", "text_encoder": "ipiqa_text_encoder", "fusion": "ipiqa_fusion"}
# What the ensemble reads from each graph, the only outputs its configs declare: a graph may have more (the
# fusion graph's gate-only ``pooled``), which Triton then never computes or sends.
SERVED_OUTPUTS = {"image_encoder": ("feature_map", "image_embedding"), "text_encoder": ("text_embedding",),
                  "fusion": ("scores",)}
PREPROCESS = triton_model.MODEL_NAME
ENSEMBLE = contract.MODEL  # one model name for the ensemble and ipiqa serve
_TYPES = {"tokens": "TYPE_INT64", "image": "TYPE_UINT8"}

# model.py and client.py are shims over ipiqa's modules, not copies of them: Triton's Python needs ipiqa
# installed anyway (the preprocessing and tokenizer are ipiqa's), and a shim always runs the installed
# ipiqa's row rules, where a copied file written by another ipiqa version could silently differ.
PREPROCESS_SHIM = f'''"""Triton python backend; the code is {triton_model.__name__} (needs pip install ipiqa in Triton's Python)."""
from {triton_model.__name__} import TritonPythonModel  # noqa: F401
'''
CLIENT_SHIM = '''"""Score one image with the ipiqa ensemble: python client.py IMAGE "PROMPT" [--url HOST:8001].

Needs pip install 'ipiqa[triton]'; the code is {module}.
"""
from {module} import main

raise SystemExit(main(outputs={outputs!r}))
'''


def _tensor(name: str, dims: Sequence[int], dtype: str = "TYPE_FP32") -> str:
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(str(d) for d in dims)} ] }}'


def _config(name: str, platform: str, max_batch: int, inputs: list[str], outputs: list[str], instances: int,
            kind: str, preferred: int) -> str:
    return "\n".join([
        f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch}",
        "input [", ",\n".join(inputs), "]", "output [", ",\n".join(outputs), "]",
        f"dynamic_batching {{ preferred_batch_size: [ {preferred} ] max_queue_delay_microseconds: 2000 }}",
        f"instance_group [ {{ count: {instances} kind: {kind} }} ]", ""])


def _step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    """One ensemble step: the model's tensor names (keys) mapped to the ensemble's (values)."""
    maps = [f'      input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items()]
    maps += [f'      output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items()]
    return "    {\n" + f'      model_name: "{model}"\n      model_version: -1\n' + "\n".join(maps) + "\n    }"


def _write_graphs(manifest: Manifest, out: Path, *, backend: str, max_batch: int, instances: int, kind: str,
                  preferred: int, shapes: dict[str, list[int]]) -> None:
    """The three graph models: the bundle's ONNX files (with their weights) or engines, and their configs."""
    platform = "onnxruntime_onnx" if backend == "onnxruntime" else "tensorrt_plan"
    for graph, name in MODEL_NAMES.items():
        spec = manifest.onnx.graphs[graph]
        version = out / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        if backend == "onnxruntime":
            shutil.copyfile(manifest.graph_path(graph), version / "model.onnx")
            data = manifest.graph_path(graph).name + ".data"  # the graph refers to its weights by this name
            shutil.copyfile(manifest.root / data, version / data)
        else:
            shutil.copyfile(manifest.engine_path(graph), version / "model.plan")
        missing = set(SERVED_OUTPUTS[graph]) - set(spec.outputs)
        if missing:
            raise IPIQAError(f"{manifest.root}: graph {graph!r} has no output {sorted(missing)} that the Triton "
                             "ensemble needs; re-export the bundle with this ipiqa")
        text = _config(name, platform, max_batch,
                       [_tensor(i, shapes[i], _TYPES.get(i, "TYPE_FP32")) for i in spec.inputs],
                       [_tensor(o, shapes[o]) for o in spec.outputs if o in SERVED_OUTPUTS[graph]],
                       instances, kind, preferred)
        (out / name / "config.pbtxt").write_text(text)


def _write_preprocess(manifest: Manifest, out: Path, max_batch: int, instances: int, shapes: dict[str, list[int]]) -> None:
    """The python model: shim, tokenizer file and a config whose parameters ``TritonPythonModel`` reads."""
    cfg = manifest.config
    version = out / PREPROCESS / "1"
    version.mkdir(parents=True, exist_ok=True)
    (version / "model.py").write_text(PREPROCESS_SHIM)
    shutil.copyfile(manifest.root / manifest.tokenizer.files["json"], version / triton_model.TOKENIZER_FILE)
    (out / PREPROCESS / "config.pbtxt").write_text("\n".join([
        f'name: "{PREPROCESS}"', 'backend: "python"', f"max_batch_size: {max_batch}",
        "input [", _tensor("IMAGE", [1], "TYPE_STRING") + ",", _tensor("PROMPT", [1], "TYPE_STRING"), "]",
        "output [", _tensor("image", shapes["image"], "TYPE_UINT8") + ",",
        _tensor("tokens", shapes["tokens"], "TYPE_INT64"), "]",
        f'parameters {{ key: "resolution" value {{ string_value: "{cfg.resolution}" }} }}',
        f'parameters {{ key: "context_length" value {{ string_value: "{cfg.context_length}" }} }}',
        f"instance_group [ {{ count: {max(2, instances)} kind: KIND_CPU }} ]", ""]))


def _write_ensemble(out: Path, max_batch: int, description: dict[str, str]) -> None:
    """IMAGE + PROMPT -> preprocess -> both encoders -> fusion -> SCORES; the config's parameters are the model's
    description as ``ipiqa serve`` answers it (``runtime.serve.contract``), so one client reads both."""
    same = lambda names: {n: n for n in names}  # noqa: E731 - the graphs' tensor names are the ensemble's
    steps = [
        (PREPROCESS, same(("IMAGE", "PROMPT")), same(("image", "tokens"))),
        (MODEL_NAMES["image_encoder"], same(("image",)), same(SERVED_OUTPUTS["image_encoder"])),
        (MODEL_NAMES["text_encoder"], same(("tokens",)), same(SERVED_OUTPUTS["text_encoder"])),
        (MODEL_NAMES["fusion"], same((*SERVED_OUTPUTS["image_encoder"], *SERVED_OUTPUTS["text_encoder"])),
         {"scores": "SCORES"}),
    ]
    (out / ENSEMBLE / "1").mkdir(parents=True, exist_ok=True)
    (out / ENSEMBLE / "config.pbtxt").write_text("\n".join([
        f'name: "{ENSEMBLE}"', 'platform: "ensemble"', f"max_batch_size: {max_batch}",
        "input [", _tensor("IMAGE", [1], "TYPE_STRING") + ",", _tensor("PROMPT", [1], "TYPE_STRING"), "]",
        "output [", _tensor(contract.SCORES, [len(description[contract.OUTPUTS_PARAMETER].split(","))]), "]",
        *[f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in description.items()],
        "ensemble_scheduling {", "  step [", ",\n".join(_step(*s) for s in steps), "  ]", "}", ""]))


def write_triton_repository(manifest: Manifest, out: Path, backend: str = "onnxruntime", max_batch: int = 128,
                            instances: int = 1, kind: str = "KIND_GPU") -> Path:
    """Write the five models and ``client.py``; ``backend`` "tensorrt" uses the bundle's engines (same GPU/TensorRT as Triton's)."""
    if backend not in ("onnxruntime", "tensorrt"):
        raise IPIQAError(f"Triton backend must be onnxruntime or tensorrt, got {backend!r}")
    if kind not in ("KIND_GPU", "KIND_CPU"):
        raise IPIQAError(f"instance kind must be KIND_GPU or KIND_CPU, got {kind!r}")
    cfg = manifest.config
    if not cfg.text:
        raise IPIQAError("the Triton ensemble is for models with the text branch (config text=True)")
    engines = manifest.engines
    if backend == "tensorrt":
        if engines is None:
            raise IPIQAError(f"{manifest.root}: no TensorRT engines in the bundle; export without --onnx-only, "
                             "or use the onnxruntime Triton backend")
        if engines.batch[0] > 1:  # Triton's dynamic batcher forms batches of 1 whenever one request waits alone
            raise IPIQAError(f"{manifest.root}: the engines' batch profile starts at {engines.batch[0]}, but Triton "
                             "sends batches as small as 1, which such an engine refuses; rebuild the engines with "
                             f"--batch 1,{engines.batch[1]},{engines.batch[2]} for Triton (ipiqa's own runtime pads "
                             "short batches), or write the repository with --triton-backend onnxruntime")
        max_batch = min(max_batch, engines.batch[2])
    preferred = min(max_batch, engines.batch[1] if engines else 32)
    shapes = {k: [int(d) for d in shape[1:]] for k, (shape, _) in io_shapes(cfg).items()}  # per row: Triton batches
    out.mkdir(parents=True, exist_ok=True)
    _write_graphs(manifest, out, backend=backend, max_batch=max_batch, instances=instances, kind=kind,
                  preferred=preferred, shapes=shapes)
    _write_preprocess(manifest, out, max_batch, instances, shapes)
    _write_ensemble(out, max_batch, contract.ServedModel.parameters(
        cfg.outputs, contract.bundle_sha256(manifest.root), needs_prompt=True, resolution=cfg.resolution))
    (out / "client.py").write_text(CLIENT_SHIM.format(module=triton_client.__name__, outputs=list(cfg.outputs)))
    return out
