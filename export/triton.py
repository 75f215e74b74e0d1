"""A Triton Inference Server model repository from a bundle.

    ipiqa_preprocess     python backend: image bytes + prompt -> uint8 resized image + token ids
    ipiqa_image_encoder  onnxruntime (or tensorrt) : image -> feature_map, image_embedding
    ipiqa_text_encoder   onnxruntime (or tensorrt) : tokens -> text_embedding
    ipiqa_fusion         onnxruntime (or tensorrt) : feature_map, image_embedding, text_embedding -> scores
    ipiqa                ensemble: IMAGE (bytes), PROMPT (string) -> SCORES

A client sends the raw image file and its prompt and gets the scores. Triton cannot run on this
project's machines: the repository is validated structurally (configs parsed into Triton's ModelConfig
message, names and shapes checked against the ONNX graphs), not served.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from ipiqa.bundle import Manifest
from ipiqa.errors import IPIQAError

__all__ = ["write_triton_repository", "MODEL_NAMES"]

MODEL_NAMES = {"image_encoder": "ipiqa_image_encoder", "text_encoder": "ipiqa_text_encoder", "fusion": "ipiqa_fusion"}
_TYPES = {"tokens": "TYPE_INT64", "image": "TYPE_UINT8"}


def _tensor(name: str, dims: Sequence[int], dtype: str = "TYPE_FP32") -> str:
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(str(d) for d in dims)} ] }}'


def _config(name: str, platform: str, max_batch: int, inputs: list[str], outputs: list[str], instances: int,
            kind: str, preferred: int) -> str:
    return "\n".join([
        f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch}",
        "input [", ",\n".join(inputs), "]", "output [", ",\n".join(outputs), "]",
        f"dynamic_batching {{ preferred_batch_size: [ {preferred} ] max_queue_delay_microseconds: 2000 }}",
        f"instance_group [ {{ count: {instances} kind: {kind} }} ]", ""])


PREPROCESS_MODEL = '''"""Triton python backend: IMAGE (encoded bytes) + PROMPT -> image (R, R, 3) UINT8 and tokens (L,) INT64.

Needs ipiqa installed in the server's Python environment (pip install ipiqa): the same preprocessing and
tokenizer as the runtime, so Triton's scores equal the runtime's.
"""
import json
from io import BytesIO
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from PIL import Image

from ipiqa.preprocess import resized
from ipiqa.runtime.tokenizer import ClipTokenizer


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.resolution = int(params["resolution"]["string_value"])
        here = Path(args["model_repository"]) / args["model_version"]
        self.tokenizer = ClipTokenizer(here / "tokenizer.json", int(params["context_length"]["string_value"]))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                blobs = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
                prompts = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy().reshape(-1)
                images = np.stack([resized(Image.open(BytesIO(bytes(b))), self.resolution) for b in blobs])
                tokens = self.tokenizer([_text(p) for p in prompts])
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("image", images), pb_utils.Tensor("tokens", tokens)]))
            except Exception as exc:  # one bad request must not take the others down
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"ipiqa_preprocess: {exc}")))
        return responses
'''

CLIENT = '''"""Score one image with the ipiqa ensemble on a running Triton server: python client.py IMAGE "PROMPT"."""
import sys

import numpy as np
import tritonclient.http as http

url = "localhost:8000"
image, prompt = sys.argv[1], sys.argv[2]
client = http.InferenceServerClient(url)
blob = np.array([[open(image, "rb").read()]], dtype=object)
text = np.array([[prompt.encode("utf-8")]], dtype=object)
inputs = [http.InferInput("IMAGE", [1, 1], "BYTES"), http.InferInput("PROMPT", [1, 1], "BYTES")]
inputs[0].set_data_from_numpy(blob)
inputs[1].set_data_from_numpy(text)
result = client.infer("ipiqa", inputs, outputs=[http.InferRequestedOutput("SCORES")])
print(dict(zip(OUTPUTS, result.as_numpy("SCORES")[0].tolist())))
'''


def write_triton_repository(manifest: Manifest, out: Path, backend: str = "onnxruntime", max_batch: int = 128,
                            instances: int = 1, kind: str = "KIND_GPU") -> Path:
    """Write the five models; ``backend`` "tensorrt" uses the bundle's engines (same GPU/TensorRT as Triton's)."""
    if backend not in ("onnxruntime", "tensorrt"):
        raise IPIQAError(f"Triton backend must be onnxruntime or tensorrt, got {backend!r}")
    if kind not in ("KIND_GPU", "KIND_CPU"):
        raise IPIQAError(f"instance kind must be KIND_GPU or KIND_CPU, got {kind!r}")
    cfg = manifest.config
    if not cfg.text:
        raise IPIQAError("the Triton ensemble is for models with the text branch (config text=True)")
    engines = manifest.data.get("engines")
    if backend == "tensorrt":
        if not engines:
            raise IPIQAError(f"{manifest.root}: no TensorRT engines in the bundle; export without --onnx-only, "
                             "or use the onnxruntime Triton backend")
        max_batch = min(max_batch, int(engines["batch"][2]))
    preferred = min(max_batch, int(engines["batch"][1]) if engines else 32)
    shapes = {k: [int(d) for d in v[1:]] for k, v in manifest.data["shapes"].items()}
    shapes["scores"] = [cfg.num_outputs]
    out.mkdir(parents=True, exist_ok=True)
    platform = "onnxruntime_onnx" if backend == "onnxruntime" else "tensorrt_plan"
    for graph, name in MODEL_NAMES.items():
        spec = manifest.data["onnx"]["graphs"][graph]
        version = out / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        if backend == "onnxruntime":
            shutil.copyfile(manifest.graph_path(graph), version / "model.onnx")
            data = manifest.graph_path(graph).name + ".data"  # the graph refers to its weights by this name
            shutil.copyfile(manifest.root / data, version / data)
        else:
            shutil.copyfile(manifest.engine_path(graph), version / "model.plan")
        text = _config(name, platform, max_batch,
                       [_tensor(i, shapes[i], _TYPES.get(i, "TYPE_FP32")) for i in spec["inputs"]],
                       [_tensor(o, shapes[o]) for o in spec["outputs"]], instances, kind, preferred)
        (out / name / "config.pbtxt").write_text(text)
    pre = out / "ipiqa_preprocess" / "1"
    pre.mkdir(parents=True, exist_ok=True)
    (pre / "model.py").write_text(PREPROCESS_MODEL)
    shutil.copyfile(manifest.root / manifest.data["tokenizer"]["files"]["json"], pre / "tokenizer.json")
    (out / "ipiqa_preprocess" / "config.pbtxt").write_text("\n".join([
        'name: "ipiqa_preprocess"', 'backend: "python"', f"max_batch_size: {max_batch}",
        "input [", _tensor("IMAGE", [1], "TYPE_STRING") + ",", _tensor("PROMPT", [1], "TYPE_STRING"), "]",
        "output [", _tensor("image", shapes["image"], "TYPE_UINT8") + ",", _tensor("tokens", shapes["tokens"], "TYPE_INT64"), "]",
        f'parameters {{ key: "resolution" value {{ string_value: "{cfg.resolution}" }} }}',
        f'parameters {{ key: "context_length" value {{ string_value: "{cfg.context_length}" }} }}',
        f"instance_group [ {{ count: {max(2, instances)} kind: KIND_CPU }} ]", ""]))
    steps = [
        ("ipiqa_preprocess", {"IMAGE": "IMAGE", "PROMPT": "PROMPT"}, {"image": "image", "tokens": "tokens"}),
        ("ipiqa_image_encoder", {"image": "image"}, {"feature_map": "feature_map", "image_embedding": "image_embedding"}),
        ("ipiqa_text_encoder", {"tokens": "tokens"}, {"text_embedding": "text_embedding"}),
        ("ipiqa_fusion", {k: k for k in ("feature_map", "image_embedding", "text_embedding")}, {"scores": "SCORES"}),
    ]

    def step(model, inputs, outputs):
        maps = [f'      input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items()]
        maps += [f'      output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items()]
        return "    {\n" + f'      model_name: "{model}"\n      model_version: -1\n' + "\n".join(maps) + "\n    }"

    (out / "ipiqa" / "1").mkdir(parents=True, exist_ok=True)
    (out / "ipiqa" / "config.pbtxt").write_text("\n".join([
        'name: "ipiqa"', 'platform: "ensemble"', f"max_batch_size: {max_batch}",
        "input [", _tensor("IMAGE", [1], "TYPE_STRING") + ",", _tensor("PROMPT", [1], "TYPE_STRING"), "]",
        "output [", _tensor("SCORES", [cfg.num_outputs]), "]",
        "ensemble_scheduling {", "  step [", ",\n".join(step(*s) for s in steps), "  ]", "}", ""]))
    (out / "client.py").write_text(CLIENT.replace("OUTPUTS", repr(list(cfg.outputs))))
    return out
