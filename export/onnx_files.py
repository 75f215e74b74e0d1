"""Writing an ONNX graph the way every bundle graph is written: weights beside it, then checked. Torch-free,
so the FP16 converter and the INT8 quantizer save without importing the exporter."""
from __future__ import annotations

from pathlib import Path

from ipiqa._optional import require
from ipiqa.errors import IPIQAError

__all__ = ["save_checked"]


def save_checked(proto, path: Path, what: str) -> Path:
    """Save with every weight in ``<name>.onnx.data`` beside the graph, then refuse a graph onnx.checker
    rejects (full check), naming the file. Small constants (shapes, axes) stay inline so shape inference and
    parsers can read them."""
    onnx = require("onnx", extra="export")
    path.parent.mkdir(parents=True, exist_ok=True)
    data_file = path.name + ".data"
    (path.parent / data_file).unlink(missing_ok=True)  # save_model appends to an existing data file
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_file, size_threshold=1024)
    try:
        onnx.checker.check_model(str(path), full_check=True)  # path form: works with external data
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise IPIQAError(f"{path}: the {what} failed onnx.checker: {str(exc).splitlines()[0]}") from None
    return path
