"""One device rule (ipiqa.device): every torch entry point reads --device through it, CUDA without a GPU refused."""
from __future__ import annotations

import pytest
import torch

from ipiqa.device import parse_device
from ipiqa.errors import IPIQAError

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch sees no GPU")


def test_auto_is_cpu_or_the_first_gpu():
    assert parse_device("auto").resolve_torch() == ("cuda:0" if torch.cuda.is_available() else "cpu")


@no_gpu
@pytest.mark.parametrize("text", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_refused_not_a_cpu_fallback(text):
    with pytest.raises(IPIQAError, match="torch sees no CUDA GPU here; use --device cpu or auto"):
        parse_device(text).resolve_torch()


@no_gpu
def test_the_torch_backend_and_the_training_loop_and_the_decoder_share_the_rule(tiny_model_file):
    from ipiqa.runtime.backends.pytorch import TorchBackend
    from ipiqa.runtime.backends.torch_images import decode_resize
    from ipiqa.training.loop import resolve_device

    for call in (lambda: TorchBackend(tiny_model_file, "cuda"), lambda: resolve_device("cuda"),
                 lambda: decode_resize([], 64, "cuda")):
        with pytest.raises(IPIQAError, match="--device cuda:0: torch sees no CUDA GPU here"):
            call()
