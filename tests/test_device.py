"""One reading of --device for every entry point."""
from __future__ import annotations

import pytest

from ipiqa.device import Device, parse_device
from ipiqa.errors import IPIQAError


@pytest.mark.parametrize("text,expected", [("auto", Device("auto")), ("cpu", Device("cpu")), ("cuda", Device("cuda", 0)),
                                           ("cuda:3", Device("cuda", 3)), (" CUDA:1 ", Device("cuda", 1))])
def test_the_four_forms_are_read(text, expected):
    assert parse_device(text) == expected


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:x", "cpu:0", "auto:1", "mps", ""])
def test_anything_else_is_refused_naming_the_forms(text):
    with pytest.raises(IPIQAError, match="auto, cpu, cuda or cuda:N"):
        parse_device(text)


def test_scorer_and_training_refuse_a_bad_device_with_the_same_message(tiny_bundle):
    from ipiqa.runtime.scorer import Scorer
    from ipiqa.training.loop import resolve_device

    with pytest.raises(IPIQAError) as a:
        Scorer(tiny_bundle, device="gpu")
    with pytest.raises(IPIQAError) as b:
        resolve_device("gpu")
    assert str(a.value) == str(b.value)


def test_auto_resolves_to_cpu_for_torch_without_a_gpu():
    torch = pytest.importorskip("torch")
    assert parse_device("auto").resolve_torch() == ("cuda:0" if torch.cuda.is_available() else "cpu")
