"""Seeded tiny inputs and authors'-layout checkpoint files, made by the tests themselves."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
torch = pytest.importorskip("torch", reason="the PyTorch reference needs ipiqa[torch]")

from authors_layout import authors_files  # noqa: E402
from ipiqa.demo import SMOKE_ARCH  # noqa: E402
from ipiqa.runtime.cpu import FLAGS_ENV, hardware_flags, usable_cores  # noqa: E402

# Each pytest-xdist worker (``$PYTEST_XDIST_WORKER_COUNT`` of them) gets its share of the cores for torch.
torch.set_num_threads(max(1, usable_cores() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

MAX_WORKERS = 4  # an RN50-512 test file peaks near 6 GB; more workers than cores only contend


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (the default, pyproject's addopts): one worker per usable core, at most ``MAX_WORKERS``."""
    return max(1, min(MAX_WORKERS, usable_cores()))


# ---------------------------------------------------------------- CPU families: every flag branch on every machine


@dataclass(frozen=True)
class CpuFamily:
    """One CPU family's flags (as /proc/cpuinfo lists them), set through ``$IPIQA_CPU_FLAGS`` for a test."""

    name: str
    flags: frozenset[str]

    @property
    def bf16(self) -> bool:
        return bool(self.flags & {"amx_bf16", "avx512_bf16"})

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags

    @property
    def vnni(self) -> bool:  # int8 dot products
        return bool(self.flags & {"amx_int8", "avx512_vnni", "avx_vnni"})


_BASE = frozenset({"sse4_2", "avx", "avx2", "fma"})
CPU_FAMILIES = (
    CpuFamily("amx-xeon", _BASE | {"avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}),
    CpuFamily("zen4", _BASE | {"avx512f", "avx512_vnni", "avx512_bf16"}),  # AMD EPYC 9004: BF16 without AMX
    CpuFamily("icelake", _BASE | {"avx512f", "avx512_vnni"}),  # VNNI, no BF16
    CpuFamily("avx2", _BASE),  # Haswell to Zen 3: no AVX-512, no VNNI
)


@pytest.fixture(params=CPU_FAMILIES, ids=[f.name for f in CPU_FAMILIES])
def cpu_family(request, monkeypatch) -> CpuFamily:
    """The test runs once per CPU family, its flags injected (child processes inherit them)."""
    family = request.param
    monkeypatch.setenv(FLAGS_ENV, ",".join(sorted(family.flags)))
    return family


@contextmanager
def hardware_flags_only():
    """Inside: this CPU's own flags, whatever ``$IPIQA_CPU_FLAGS`` says (a fixture making, say, a BF16-gated bundle
    while the suite runs as another family)."""
    saved = os.environ.pop(FLAGS_ENV, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[FLAGS_ENV] = saved


@pytest.fixture
def real_cpu_flags(monkeypatch) -> None:
    """The test decides with this CPU's own flags, whatever ``$IPIQA_CPU_FLAGS`` the suite runs with."""
    monkeypatch.delenv(FLAGS_ENV, raising=False)


def needs_hardware(*flags: str):
    """For numerics, which injected flags cannot change: skip unless this CPU really has one of ``flags``, and
    run with the hardware's flags (``real_cpu_flags``), so the branches agree with the instructions."""
    have = [f for f in flags if f in hardware_flags()]
    skip = pytest.mark.skipif(not have, reason=f"needs the real instruction: this CPU has none of {', '.join(flags)}")
    return lambda test: skip(pytest.mark.usefixtures("real_cpu_flags")(test))


def save_torchscript(state_dict: dict, path: Path) -> Path:
    """A TorchScript archive holding ``state_dict`` the way OpenAI's RN50.pt does (fp16 tensors)."""
    root = torch.nn.Module()
    for key, tensor in state_dict.items():
        *parents, leaf = key.split(".")
        mod = root
        for name in parents:
            if not hasattr(mod, name):
                mod.add_module(name, torch.nn.Module())
            mod = getattr(mod, name)
        if tensor.is_floating_point():
            mod.register_parameter(leaf, torch.nn.Parameter(tensor.half(), requires_grad=False))
        else:
            mod.register_buffer(leaf, tensor)
    torch.jit.save(torch.jit.script(root), str(path))
    return path


def write_authors_files(tmp: Path, **variant) -> tuple[Path, Path, dict, dict]:
    ft, clip = authors_files(**variant)
    ft_path, clip_path = tmp / "ft.pth", tmp / "RN50_state_dict.pt"
    torch.save({"model": ft, "config": {"run": {"seed": 42}}, "epoch": 99}, ft_path)
    torch.save(clip, clip_path)
    return ft_path, clip_path, ft, clip


@pytest.fixture(scope="session")
def authors_512(tmp_path_factory):
    """The TSV's configuration exactly: 512 px, two outputs, MLP head."""
    return write_authors_files(tmp_path_factory.mktemp("authors512"), resolution=512, n_out=2, head="mlp")


@pytest.fixture(scope="session")
def authors_224_linear(tmp_path_factory):
    return write_authors_files(tmp_path_factory.mktemp("authors224"), resolution=224, n_out=1, head="linear", seed=1)


def make_image(path: Path, size=(64, 48), mode="RGB", seed=0) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    return path


TINY = dict(resolution=64, **SMOKE_ARCH)


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory):
    """A seeded, reduced-width model file (the real layout, small widths) for fast CLI tests."""
    from ipiqa.checkpoint import save_model
    from ipiqa.config import IPIQAConfig
    from ipiqa.demo import demo_model

    cfg = IPIQAConfig(**TINY)
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    return save_model(path, demo_model(cfg, seed=3).state_dict(), cfg)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_model_file, tmp_path_factory):
    """The tiny model exported to an ONNX bundle (shared by runtime, Ray and Triton tests)."""
    from ipiqa.checkpoint import load_model
    from ipiqa.export.bundle_export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("tiny_bundle") / "bundle"
    export_bundle(load_model(tiny_model_file), [tiny_model_file], out, ExportOptions(onnx_only=True), progress=lambda m: None)
    return out


@pytest.fixture(scope="module")
def scorer(tiny_bundle):
    """The tiny bundle on ONNX Runtime CPU, shared by the tests of one module."""
    from ipiqa.runtime.scorer import Scorer

    with Scorer(tiny_bundle, backend="onnxruntime", device="cpu") as s:
        yield s


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """One small PNG on disk."""
    return make_image(tmp_path_factory.mktemp("img") / "a.png", seed=5)


def read_csv(path) -> list[dict]:
    """An output CSV as dicts (all cells text, as a user's tools read it)."""
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------- score bounds from the spec's FP32 rule and the floor


def reference_scores(model_file, images, prompts) -> tuple[np.ndarray, np.ndarray]:
    """The reference's scores on these files in FP32 and in float64: the model in ``model_file`` with the
    straightforward pooling (as the parity gate runs it), each file decoded and resized as the runtime does."""
    import copy

    from ipiqa.checkpoint import load_model
    from ipiqa.model import straightforward_pooling, tokenize
    from ipiqa.runtime.pipeline import load_input

    model = load_model(model_file).eval()
    model64 = copy.deepcopy(model).double()
    pixels = torch.from_numpy(np.stack([load_input(str(p), model.cfg.resolution) for p in images]))
    tokens = tokenize(list(prompts), model.cfg.context_length) if model.cfg.text else None
    with torch.no_grad(), straightforward_pooling(model), straightforward_pooling(model64):
        out = [m.fuse(*m.encode_pixels(pixels), None if tokens is None else m.encode_text(tokens)).numpy()
               for m in (model, model64)]
    return out[0], out[1]


def fp32_rule_tolerance(model_file, images, prompts) -> float:
    """The parity gate's FP32 rule on these inputs (``export.parity.check_tolerance``): how far a runtime backend's
    scores may be from the reference's, ``max(1e-4 x max(1, score range), k x floor)``, the floor measured here."""
    from ipiqa.export.parity import check_tolerance

    ref, ref64 = reference_scores(model_file, images, prompts)
    return check_tolerance(float(np.ptp(ref)), float(np.abs(ref - ref64).max()))[0]


def same_model_tolerance(model_file, images, prompts) -> float:
    """How far two FP32 evaluations of one model (one backend batching differently, resuming at another row,
    running in another process) may differ on these inputs: each within k x the reference's own FP32 error (the
    floor, float32 against float64 on this machine's kernels; k the gate's FLOOR_MULTIPLE), so 2k x floor between
    them. It follows the machine's rounding, never a figure measured on one CPU; on the tiny model it is ~400x
    below the FP32 rule's fixed part, so a row scored with its neighbour's image fails it (the fixed part would not)."""
    from ipiqa.export.parity import FLOOR_MULTIPLE

    ref, ref64 = reference_scores(model_file, images, prompts)
    return 2 * FLOOR_MULTIPLE * float(np.abs(ref - ref64).max())
