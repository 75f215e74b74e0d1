"""The image graph takes uint8 (B, R, R, 3) and normalizes inside, exactly as the host reference does."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ipiqa.bundle import read_bundle
from ipiqa.errors import BundleError
from ipiqa.manifest import io_shapes
from ipiqa.model import normalize_pixels
from ipiqa.preprocess import normalize


def test_device_normalization_equals_the_host_reference_bit_for_bit_for_every_value():
    pixels = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None, None, None], (256, 2, 2, 3)).copy()
    ours = normalize_pixels(torch.from_numpy(pixels)).numpy()
    assert ours.dtype == np.float32 and np.array_equal(ours, normalize(pixels))


def test_the_bundle_records_a_uint8_nhwc_image_input(tiny_bundle):
    manifest = read_bundle(tiny_bundle)
    r = manifest.config.resolution
    assert io_shapes(manifest.config)["image"] == ((None, r, r, 3), "uint8")  # shapes follow from the config


def test_a_bundle_of_the_float_input_format_is_refused_with_the_rebuild_command(tiny_bundle, tmp_path):
    old = shutil.copytree(tiny_bundle, tmp_path / "old")
    data = json.loads((old / "manifest.json").read_text())
    data["format"] = "ipiqa-bundle/1"
    (old / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="ipiqa-bundle/1.*rebuild it with: ipiqa-export"):
        read_bundle(old)
