"""The text graph at BF16 on OpenVINO: its end-of-text search moved onto integer ids.

The exported text graph finds end-of-text with an ArgMax over the token ids cast to float32 (TensorRT refuses
ArgMax on INT64). OpenVINO's BF16 hint covers a whole compiled graph, so that cast becomes a BF16 cast: ids near
49407 round to the same value (BF16 keeps 8 significant bits: a step of 256 there), the ArgMax takes the first
of the ties and the wrong row is read (min cosine 0.43 over 394 dataset prompts on RN50-512, measured). Integer
ops stay integer under the hint, so casting the ids to int32 instead (exact: the vocabulary has 49,408 ids) makes
the search exact at any precision, with no second graph file: the backend rewrites the model it read, and the
BF16 text gate judges that very model (measured there: min cosine 0.99992, text graph 1.8x its FP32 time cut).
"""
from __future__ import annotations

from typing import Any, Optional

from ipiqa._optional import require

__all__ = ["integer_end_of_text"]


def integer_end_of_text(model: Any) -> Optional[str]:
    """Rewrite ``model`` (an ``openvino.Model`` of the text graph) in place so its end-of-text TopK reads the
    ``tokens`` cast to int32 instead of float32; returns None when done, else why it could not (a graph of
    another shape: the caller then refuses BF16 for the text graph rather than serve a wrong row)."""
    ov = require("openvino", extra="openvino")
    params = [p for p in model.get_parameters() if p.get_friendly_name() == "tokens"]
    if len(params) != 1:
        return f"the text graph has {len(params)} inputs named tokens"
    tokens = params[0].output(0)
    float_casts = [t.get_node() for t in tokens.get_target_inputs()
                   if t.get_node().get_type_name() == "Convert" and t.get_node().get_output_element_type(0) == ov.Type.f32]
    searches = [(cast, t) for cast in float_casts for t in cast.output(0).get_target_inputs()
                if t.get_node().get_type_name() == "TopK"]
    if len(searches) != 1:
        return f"{len(searches)} end-of-text searches (TopK over the float token ids) in the text graph, expected one"
    cast, target = searches[0]
    if len(cast.output(0).get_target_inputs()) != 1:
        return "the float token ids feed more than the end-of-text search"
    integer = ov.opset13.convert(tokens, ov.Type.i32)
    integer.set_friendly_name(cast.get_friendly_name() + "/int32")
    target.replace_source_output(integer.output(0))
    model.validate_nodes_and_infer_types()
    return None
