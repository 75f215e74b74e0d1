"""``ipiqa-export``: a model file (or the authors' checkpoint) -> a deployable bundle."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Optional

import click

from ipiqa.bundle import parse_batch_profile
from ipiqa.console import ImagesPath, InputPath, friendly, format_table, text_option
from ipiqa.runtime.cpu import usable_cores

from .checks import ToleranceOverride
from .options import DEFAULT_OPSET, ExportOptions, Int8Options, ParityGateError, check_bf16_gating
from .trt import EngineSpec

# What an export imports, checked after the options and before any work; a base install gets the pip line.
EXPORT_MODULES = ("torch", "open_clip", "onnx", "onnxscript")


def _batch(ctx, param, value: str) -> tuple[int, int, int]:
    text_option(ctx, param, value)
    try:
        return parse_batch_profile(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _int8_setting(ctx, param, values) -> dict:
    text_option(ctx, param, values)
    if not values:
        return {}
    from ipiqa._optional import require
    from ipiqa.errors import IPIQAError

    try:  # the INT8 export needs torch; a base install gets the pip line before any other check
        require("torch", extra="export")
    except IPIQAError as exc:
        raise click.ClickException(str(exc)) from None
    from .int8_settings import parse_setting

    out: dict = {}
    try:
        for text in values:
            target, key, value = parse_setting(text)
            for t in (target,) if target else ("cpu", "tensorrt"):
                out.setdefault(t, {})[key] = value
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return out


def _check_table(checks) -> str:
    """Every gate check (objects, or manifest records read back by ``check_from_dict``) through the one check
    protocol: what was measured, against which bound, max |diff|, and how the bound came about."""
    from .checks import check_from_dict

    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    rows = []
    for c in checks:
        c = check_from_dict(c) if isinstance(c, dict) else c
        rows.append([c.name, f"{c.measure_name} {fmt(c.measure, '.6g') or 'not gated'}", fmt(c.bound, '.6g'),
                     fmt(c.max_abs, '.2e'), c.passed, c.note])
    return format_table(["check", "measure", "bound", "max |diff|", "passed", "note"], rows)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model", required=False, type=InputPath(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path), help="Bundle folder.")
@click.option("--official", type=InputPath(exists=True, dir_okay=False, path_type=Path),
              help="Export the authors' fine-tuned .pth directly (needs --clip) instead of MODEL.")
@click.option("--clip", "clip_path", type=InputPath(exists=True, dir_okay=False, path_type=Path),
              help="Base CLIP RN50 weights for --official.")
@click.option("--onnx-only", is_flag=True, help="Write the ONNX graphs and manifest; build no TensorRT engines.")
@click.option("--fp16/--fp32", "fp16", default=None,
              help="TensorRT engine precision [default: fp16]. FP16 engines are built from the fp16/ ONNX graphs "
                   "(always written for them), FP32 engines from the FP32 graphs.")
@click.option("--fp16-onnx", is_flag=True,
              help="Also write the gated fp16/ ONNX graphs without building FP16 engines (ONNX Runtime GPU, Triton).")
@click.option("--bf16", is_flag=True,
              help="Gate the FP32 graphs at BF16 on OpenVINO (pip install 'ipiqa[openvino]'; run on a CPU with AMX or "
                   "AVX512-BF16, like those that will serve it), so 'ipiqa score --precision bf16' may serve them.")
@click.option("--bf16-text", "bf16_text", is_flag=True,
              help="With --bf16: also gate the text graph at BF16 on OpenVINO, its end-of-text search moved onto "
                   "int32 token ids, per prompt (text-embedding cosine >= 0.999 against ONNX Runtime FP32, over the "
                   "same prompts as --int8-text). Where it passes, OpenVINO runs the text graph at BF16 beside "
                   "--precision bf16 and int8 on BF16 CPUs (the backend name says +text-bf16); a failed gate is "
                   "recorded and the text graph stays FP32. Without this flag the text graph stays FP32.")
@click.option("--int8", is_flag=True,
              help="Quantize the image graph to INT8 on --calibration images and gate it on held-out ones: for the "
                   "CPU always; with engines, also an INT8 image engine (text and fusion engines FP16).")
@click.option("--int8-text", "int8_text", is_flag=True,
              help="With --int8: also quantize the text graph's MatMul/Gemm to INT8 (weights per channel, activations "
                   "dynamic; LayerNorm, softmax and the end-of-text lookup kept FP32) and gate it per prompt (text-"
                   "embedding cosine >= 0.995 against FP32, on this CPU, over the gate's prompts and every distinct "
                   "prompt of ../shared/datasets' label files or $IPIQA_PROMPT_DATASETS when present). "
                   "'ipiqa score --precision int8' on ONNX Runtime runs it only where that gate passed; a failed "
                   "gate is recorded and the FP32 text graph is served. Without this flag the text graph stays FP32.")
@click.option("--calibration", type=ImagesPath(exists=True, path_type=Path),
              help="--int8: images like those you will score, as 'ipiqa score --images' takes them: a folder, a "
                   "CSV/JSONL manifest (its 'prompt' column is used by the gate; rows may name SHARD::KEY or "
                   "FILE::ROW), tar shards ('shards/*.tar', a brace pattern, a list file) or Parquet files. 1 in 5 "
                   "(4 to 32) is held out for the gate, never calibrated on.")
@click.option("--calibration-size", default=64, show_default=True, type=click.IntRange(1),
              help="--int8: at most this many images calibrate (evenly spread over the rest).")
@click.option("--int8-setting", "int8_settings", multiple=True, callback=_int8_setting, metavar="[TARGET.]KEY=VALUE",
              help="--int8: override a quantization setting (export.int8_settings.QuantSettings), for both targets or one "
                   "(cpu., tensorrt.), e.g. calibrate_method=percentile, cpu.reduce_range=false. Recorded.")
@click.option("--batch", default="1,32,128", show_default=True, callback=_batch,
              help="TensorRT batch profile MIN,OPT,MAX (engines run any batch in [MIN, MAX]).")
@click.option("--workspace", default=4.0, show_default=True, type=float, help="TensorRT builder workspace (GiB).")
@click.option("--straightforward-pooling", is_flag=True,
              help="Export the pools as written (project all 257 tokens) instead of the exact single-query rewrite.")
@click.option("--opset", default=DEFAULT_OPSET, show_default=True, type=click.IntRange(17), help="ONNX opset (>= 17).")
@click.option("--triton", "triton_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also write a Triton model repository here (ensemble: image bytes + prompt -> scores).")
@click.option("--triton-backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
              show_default=True, help="Triton backend for the three graphs.")
@click.option("--atol", type=click.FloatRange(min=0), default=None,
              help="Override the parity gate: pass each check at ATOL + RTOL x scale instead of the measured rule "
                   "(recorded in the manifest; logged as a warning).")
@click.option("--rtol", type=click.FloatRange(min=0), default=None,
              help="Relative part of the override (scale: score range, or max |reference| for tensors).")
@click.option("-v", "--verbose", is_flag=True, help="Log details.")
@friendly
def main(model: Optional[Path], output: Path, official, clip_path, onnx_only, fp16, fp16_onnx, bf16, bf16_text, int8, int8_text, calibration,
         calibration_size, int8_settings, batch, workspace, straightforward_pooling, opset, triton_dir, triton_backend, atol, rtol,
         verbose) -> None:
    """Export an IP-IQA model to a bundle the runtime scores with.

    \b
    Stages: ONNX graphs (image_encoder, text_encoder, fusion; FP32, dynamic batch, weights in
    .onnx.data) -> parity gate through the runtime's ONNX Runtime backend against PyTorch
    -> fp16/ graphs (for FP16/INT8 engines, or --fp16-onnx), gated against the FP32 graphs
    -> BF16 gate (--bf16): the FP32 graphs as OpenVINO serves them at BF16 (text graph FP32),
    cosine >= 0.999 on every intermediate tensor, scores within 5e-2 (Spearman >= 0.995)
    -> BF16 text gate (--bf16-text): the text graph at BF16 on OpenVINO, per prompt (cosine >= 0.999)
    -> INT8 image graphs (--int8), gated on held-out calibration images (cosine >= 0.995;
    Spearman >= 0.99 where scores spread) -> INT8 text graph (--int8-text), gated per prompt
    (text-embedding cosine >= 0.995), recorded, served only where it passed
    -> TensorRT engines (FP16 by default; strongly typed,
    precision from the graph) -> the engine gate through the runtime's TensorRT backend
    -> manifest.json with config, preprocessing, tokenizer, versions, GPU and SHA-256 of every file.
    Gate tolerance per check: max(fixed, k x floor), where fixed is 1e-4 x max(1, scale) for FP32
    (2e-2 on FP16 scores, plus Spearman >= 0.999 on 64 inputs), the floor is the PyTorch
    reference's own FP32 error (the same model in float64 on the gate inputs) and k is printed
    with each check. --atol/--rtol replace the rule; the override is recorded in the manifest
    and logged as a warning.
    Re-running on an unchanged model reuses what is still valid.

    \b
    Examples:
      ipiqa-export model.safetensors -o bundle/ --onnx-only
      ipiqa-export model.safetensors -o bundle/ --fp16 --batch 1,32,128 --workspace 8
      ipiqa-export --official agiqa3k_best.pth --clip RN50.pt -o bundle/
      ipiqa-export model.safetensors -o bundle/ --onnx-only --triton triton_repo/
      ipiqa-export model.safetensors -o bundle/ --onnx-only --int8 --calibration images.csv
      ipiqa-export model.safetensors -o bundle/ --onnx-only --int8 --int8-text --calibration images.csv
      ipiqa-export model.safetensors -o bundle/ --onnx-only --bf16 --bf16-text
      ipiqa-export model.safetensors -o bundle/ --int8 --calibration photos/ --calibration-size 128
    """
    from ipiqa._optional import require
    from ipiqa.checkpoint import read_config
    from ipiqa.errors import IPIQAError

    # Torch-free up to the require() below: every option and the model file are checked first.
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if (model is None) == (official is None):
        raise click.UsageError("give either MODEL (.safetensors) or --official FT.pth --clip RN50.pt")
    if official and not clip_path:
        raise click.UsageError("--official needs --clip (the base CLIP RN50 weights)")
    if int8 and calibration is None:
        raise click.UsageError("--int8 needs --calibration IMAGES (a folder, manifest, shards or Parquet files like those you will score)")
    if not int8 and (calibration is not None or int8_settings):
        raise click.UsageError("--calibration and --int8-setting go with --int8")
    if bf16_text and not bf16:
        raise click.UsageError("--bf16-text goes with --bf16 (the text graph's BF16 gate runs where BF16 is gated)")
    if int8_text and not int8:
        raise click.UsageError("--int8-text goes with --int8 --calibration IMAGES (it is served in the int8 set)")
    if int8 and fp16 is False and not onnx_only:
        raise click.UsageError("--int8 builds an INT8 image engine with FP16 text and fusion engines; drop --fp32")
    try:
        spec = EngineSpec("int8" if int8 and not onnx_only else "fp16" if fp16 in (None, True) else "fp32",
                          batch, workspace)
    except ValueError as exc:  # the batch profile was checked by its callback: the workspace
        raise click.BadParameter(str(exc), param_hint="'--workspace'") from None
    try:
        override = None if atol is None and rtol is None else ToleranceOverride(atol or 0.0, rtol or 0.0)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--atol' / '--rtol'") from None
    try:
        options = ExportOptions(onnx_only=onnx_only, engine=spec, opset=opset, single_query_pooling=not straightforward_pooling,
                                tolerance_override=override, fp16_onnx=fp16_onnx, bf16=bf16, bf16_text=bf16_text, int8_text=int8_text,
                                int8=Int8Options(calibration, calibration_size, int8_settings) if int8 else None)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if bf16:  # before minutes of ONNX work
        check_bf16_gating()
    if model is not None:
        read_config(model)  # not an ipiqa model file: one line, before torch loads
    for module in EXPORT_MODULES:
        require(module, extra="export")
    import torch

    from ipiqa.checkpoint import load_model
    from ipiqa.model import IPIQA
    from ipiqa.official import import_official

    from .bundle_export import export_bundle
    from .int8 import Int8GateError
    from .int8_settings import settings_for

    try:  # a value the quantizer refuses is refused now, not after the FP32 stage
        for target in options.int8_targets:
            settings_for(target, **{"calibration_size": calibration_size, **int8_settings.get(target, {})})
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--int8-setting'") from None

    torch.set_num_threads(usable_cores())
    start = time.perf_counter()

    def progress(msg: str) -> None:
        click.echo(f"[{time.perf_counter() - start:6.1f}s] {msg}", err=True)

    if official:
        cfg, sd = import_official(official, clip_path)
        net = IPIQA(cfg)
        net.load_state_dict(sd)
        sources = [official, clip_path]
    else:
        net, sources = load_model(model), [model]
    progress(f"model: {net.cfg.resolution}px, outputs={','.join(net.cfg.outputs)}, head={net.cfg.head}")
    try:
        report = export_bundle(net, sources, output, options, progress)
    except ParityGateError as exc:
        click.echo(_check_table(exc.results), err=True)
        raise IPIQAError(str(exc)) from None
    except Int8GateError as exc:  # the table is in the message; no manifest was written
        raise IPIQAError(f"{exc}\nno manifest was written") from None
    click.echo(_check_table(report.parity))
    if report.fp16:
        fp16_info = report.fp16
        click.echo(f"\nFP16 graphs ({', '.join(g['file'] for g in fp16_info['graphs'].values())}), gated on "
                   f"{fp16_info['gate_images']} inputs against the FP32 graphs:")
        click.echo(_check_table(fp16_info["gate"]))
    if report.bf16:
        click.echo(f"\nBF16 on {report.bf16['runtime']} ({report.bf16['cpu']}; served: "
                   f"{', '.join(f'{g} {p}' for g, p in report.bf16['served'].items())}), gated on "
                   f"{report.bf16['gate_images']} inputs against the FP32 graphs:")
        click.echo(_check_table(report.bf16["gate"]))
    for target, entry in report.int8.items():
        click.echo(f"\nINT8 [{target}] {entry['file']}: {entry['settings']['activation_type']} activations, "
                   f"{entry['settings']['weight_type']} weights, {len(entry['excluded_nodes'])} layers kept FP32, "
                   f"calibrated on {entry['calibration']['images']} images, gated on {entry['calibration']['held_out']} "
                   f"held-out ({entry['criterion']}):")
        click.echo(_check_table(entry["gate"]["results"]))
    if report.int8_text:
        t = report.int8_text
        click.echo(f"\nINT8 text graph {t['file']} on {t['cpu']}: "
                   f"{'served by --precision int8 (ONNX Runtime)' if t['passed'] else 'NOT served (FP32 text graph)'}; "
                   f"gated on {t['prompt_source']}:")
        click.echo("\n".join(t["attempts"]))
    if report.bf16_text:
        t = report.bf16_text
        click.echo(f"\nBF16 text graph on {t['runtime']} ({t['cpu']}): "
                   f"{'served at BF16 by OpenVINO (bf16, int8)' if t['passed'] else 'NOT served (FP32 text graph)'}; "
                   f"min cosine {t['min_cosine']:.5f} over {t['prompts']} prompts ({t['prompt_source']})")
    click.echo(f"bundle written: {output}/manifest.json ({time.perf_counter() - start:.1f}s)", err=True)
    if triton_dir:
        from ipiqa.bundle import read_bundle

        from .triton import write_triton_repository

        write_triton_repository(read_bundle(output), triton_dir, triton_backend, max_batch=batch[2])
        click.echo(f"Triton repository written: {triton_dir} (client example: {triton_dir}/client.py)", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
