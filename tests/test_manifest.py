"""The typed bundle manifest: round trip, strict keys, the format version, io_shapes and the export reuse key."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch

from ipiqa.bundle import BUNDLE_FORMAT, read_bundle
from ipiqa.checkpoint import load_model, save_model
from ipiqa.errors import BundleError
from ipiqa.manifest import Manifest, ManifestError, io_shapes


def _data(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _rewrite(bundle, tmp_path, change) -> Path:
    out = shutil.copytree(bundle, tmp_path / "copy")
    data = _data(out)
    change(data)
    (out / "manifest.json").write_text(json.dumps(data))
    return out


def test_to_json_from_json_round_trip_is_equal(tiny_bundle):
    manifest = read_bundle(tiny_bundle)
    again = Manifest.from_json(manifest.to_json(), tiny_bundle)
    assert again == manifest and again.to_json() == manifest.to_json()
    assert manifest.to_json() == (tiny_bundle / "manifest.json").read_text()  # what the exporter wrote, byte for byte


def test_unknown_key_is_refused_naming_it(tiny_bundle):
    data = _data(tiny_bundle)
    data["onnx"]["graphs"]["fusion"]["layout"] = "NCHW"
    with pytest.raises(ManifestError, match=r"onnx\.graphs\.fusion\.layout: unknown key"):
        Manifest.from_dict(data)


def test_missing_required_key_is_refused_naming_it(tiny_bundle):
    data = _data(tiny_bundle)
    del data["source"]["key"]
    with pytest.raises(ManifestError, match=r"source\.key: missing"):
        Manifest.from_dict(data)


def test_read_bundle_names_the_manifest_file_the_key_and_the_fix(tiny_bundle, tmp_path):
    out = _rewrite(tiny_bundle, tmp_path, lambda d: d["tokenizer"].update(context_length=77))
    with pytest.raises(BundleError, match=r"manifest\.json: invalid manifest: key 'tokenizer\.context_length' unknown"
                                          r".*rebuild it with: ipiqa-export"):
        read_bundle(out)


def test_an_older_format_is_refused_with_what_changed_and_the_rebuild_command(tiny_bundle, tmp_path):
    out = _rewrite(tiny_bundle, tmp_path, lambda d: d.update(format="ipiqa-bundle/2"))
    with pytest.raises(BundleError, match=rf"'ipiqa-bundle/2', this ipiqa reads '{BUNDLE_FORMAT}' \(format 3 .*shapes"
                                          r".*\); rebuild it with: ipiqa-export MODEL.safetensors -o BUNDLE"):
        read_bundle(out)


def test_io_shapes_match_the_exported_graphs(tiny_bundle):
    """io_shapes is what the runtime sends and engines are built for; the text graph's token axis 1 is dynamic
    on top of that (short text calls: tests/test_short_tokens.py)."""
    manifest = read_bundle(tiny_bundle)
    expected = io_shapes(manifest.config)
    names = {"uint8": onnx.TensorProto.UINT8, "int64": onnx.TensorProto.INT64, "float32": onnx.TensorProto.FLOAT}
    seen = set()
    for name in manifest.onnx.graphs:
        graph = onnx.load(str(manifest.graph_path(name)), load_external_data=False).graph
        for value in [*graph.input, *graph.output]:
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim)
            shape, dtype = expected[value.name]
            if value.name == "tokens":
                shape = (None, None)
            assert (dims, value.type.tensor_type.elem_type) == (shape, names[dtype]), value.name
            seen.add(value.name)
    assert seen == set(expected)


def test_reuse_key_follows_the_weights_not_the_file(tiny_model_file, tmp_path):
    from ipiqa.export.bundle_export import ExportOptions, onnx_key

    model = load_model(tiny_model_file)
    copy = save_model(tmp_path / "elsewhere" / "renamed.safetensors", model.state_dict(), model.cfg)
    key = onnx_key(model, ExportOptions(), {}, {"ipiqa": "x"})
    assert onnx_key(load_model(copy), ExportOptions(), {}, {"ipiqa": "x"}) == key
    changed = load_model(copy)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-3
    assert onnx_key(changed, ExportOptions(), {}, {"ipiqa": "x"}) != key
