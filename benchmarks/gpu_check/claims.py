"""Part 4: the project's other GPU claims that run without TensorRT or ONNX Runtime GPU.

- the row rules hold on the device decode path: odd and broken files through ``Scorer.score_files`` with
  ``decode="device"`` give the rows ``decode="host"`` gives (the same error cells, scores within the bound);
- the README's GPU command runs: ``ipiqa score MODEL --backend torch --device cuda --fp16 --decode device``
  through the CLI's own entry point;
- TensorRT engines and ONNX Runtime GPU are not installable on the GPU image (no registry, no wheels carried):
  reported as not run, with what the image has instead, never faked.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import numpy as np

from .context import Context
from .parts import NOT_RUN, PartResult, progress, status_of

__all__ = ["odd_inputs", "rows_agree", "part"]


def odd_inputs(folder: Path) -> list[Path]:
    """Files the row rules speak of: good, grayscale, CMYK and 1 x 1 JPEGs, a PNG named .jpg, a truncated and a
    corrupt JPEG, a zero-byte file, a missing one."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    base = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
    made = {"good.jpg": base, "gray.jpg": base.convert("L"), "cmyk.jpg": base.convert("CMYK"),
            "one.jpg": base.resize((1, 1))}
    for name, img in made.items():
        img.save(folder / name, "JPEG", quality=90)
    base.save(folder / "png_named.jpg", "PNG")
    data = (folder / "good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff" + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (folder / "empty.jpg").write_bytes(b"")
    return [*(folder / n for n in made), folder / "png_named.jpg", folder / "truncated.jpg", folder / "corrupt.jpg",
            folder / "empty.jpg", folder / "missing.jpg"]


def rows_agree(host: list, device: list, atol: float) -> tuple[bool, str]:
    """Same row order, the same error cells, and every score within ``atol`` -> (agree, what differs)."""
    if [r.row.image for r in host] != [r.row.image for r in device]:
        return False, "rows in another order or missing"
    for h, d in zip(host, device):
        if (h.error is None) != (d.error is None) or (h.error and h.error != d.error):
            return False, f"{Path(h.row.image).name}: host {h.error or 'scored'} / device {d.error or 'scored'}"
    diffs = [abs(a - b) for h, d in zip(host, device) if h.scores for a, b in zip(h.scores, d.scores)]
    worst = max(diffs, default=0.0)
    return worst <= atol, f"scores max|d| {worst:.2e} (bound {atol:g})"


def _score(scorer, paths: list[Path], decode: str, out: Path) -> list:
    from ipiqa.runtime.io import Row

    results: list = []
    scorer.score_files([Row(str(p), "a generated image") for p in paths], output=out, batch_size=4, workers=2,
                       decode=decode, on_results=results.extend)
    return results


def _row_rules(ctx: Context) -> dict:
    from ipiqa.export.checks import bounds_for
    from ipiqa.runtime.scorer import Scorer

    s = ctx.settings
    paths = odd_inputs(s.workdir / "odd-inputs")
    with Scorer(ctx.model_path, backend="torch", device=s.device, fp16=s.fp16) as scorer:
        host = _score(scorer, paths, "host", s.workdir / "rules-host.csv")
        device = _score(scorer, paths, "device", s.workdir / "rules-device.csv")
    ref = np.array([r.scores for r in host if r.scores])
    atol = (bounds_for("fp16").atol if s.fp16
            else bounds_for("fp32").rtol * max(1.0, float(np.ptp(ref)) if ref.size else 1.0))
    ok, detail = rows_agree(host, device, atol)
    errors = sum(r.error is not None for r in host)
    return {"claim": "row rules on --decode device", "passed": ok,
            "figure": f"{len(host)} rows ({errors} error rows) equal host's; {detail}",
            "bound": f"the same error cells; scores within {'FP16 atol' if s.fp16 else 'the FP32 fixed part'} {atol:g}"}


def _cli(ctx: Context) -> dict:
    from ipiqa.cli import main

    from .throughput import e2e_files

    s = ctx.settings
    folder = s.workdir / "cli-images"
    for p in e2e_files(s.workdir / "e2e-jpegs", 8, min(4, s.e2e_unique)):
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / p.name).exists():
            (folder / p.name).write_bytes(p.read_bytes())
    out = s.workdir / "cli-scores.csv"
    argv = ["score", str(ctx.model_path), "--images", str(folder), "--prompt", "a generated image", "-o", str(out),
            "--backend", "torch", "--device", s.device, "--decode", "device", "--batch", "4"] + (
        ["--fp16"] if s.fp16 else [])
    progress(f"claims: ipiqa {' '.join(argv)}")
    try:
        main(argv)
        code: Optional[int] = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    lines = out.read_text(encoding="utf-8").splitlines() if out.exists() else []
    ok = code == 0 and len(lines) == 9
    return {"claim": f"ipiqa score MODEL --backend torch --device {s.device}{' --fp16' if s.fp16 else ''} --decode device",
            "passed": ok,
            "figure": f"exit {code}, {max(0, len(lines) - 1)} rows written", "bound": "exit 0, one row per image (8)",
            "command": "ipiqa " + " ".join(argv)}


def _not_installable() -> list[dict]:
    import onnxruntime as ort

    rows = []
    providers = ort.get_available_providers()
    for name, present, what in (
            ("tensorrt", importlib.util.find_spec("tensorrt") is not None, "TensorRT engines (ipiqa-export --fp16, "
             "TrtBackend, the engine gate)"),
            ("onnxruntime-gpu", any(p in providers for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")),
             "ONNX Runtime CUDA / TensorRT execution providers")):
        rows.append({"claim": what, "passed": None,
                     "figure": (f"{name} present but not exercised by this check" if present else
                                f"{NOT_RUN}: {name} is not installable on this machine (no package registry, and "
                                f"not carried as a wheel); onnxruntime providers here: {', '.join(providers)}"),
                     "bound": "n/a"})
    rows.append({"claim": "python -m benchmarks --device cuda (every backend's table)", "passed": None,
                 "figure": f"{NOT_RUN}: longer than this check's budget; its torch rows are what part 3 measures",
                 "bound": "n/a"})
    return rows


def part(ctx: Context) -> PartResult:
    rows: list[dict] = []
    for name, check in (("row rules", _row_rules), ("CLI", _cli)):
        progress(f"claims: {name}")
        try:
            rows.append(check(ctx))
        except Exception as exc:  # noqa: BLE001 - one claim's error, the next claim still runs
            rows.append({"claim": name, "passed": False, "figure": f"ERROR {type(exc).__name__}: {exc}"[:300],
                         "bound": "runs"})
        progress(f"  {'PASS' if rows[-1]['passed'] else 'FAIL'} {rows[-1]['claim']}: {rows[-1]['figure']}")
    rows += _not_installable()
    judged = [r["passed"] for r in rows if r["passed"] is not None]
    figure = "; ".join(f"{r['claim']}: {r['figure']}" for r in rows if r["passed"] is not None)
    return PartResult("claims", status_of(judged), "each claim's own bound (rows)", figure, tuple(rows),
                      tuple(f"{r['claim']}: {r['figure']}" for r in rows if r["passed"] is None))
