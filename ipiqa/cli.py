"""``ipiqa`` command line. Heavy imports (torch, onnx) live inside command bodies so ``--help`` is instant."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import click

from .console import EXIT_ROW_ERRORS, InputPath, device_option, friendly, format_table, text_option
from ._optional import require, require_torch
from .config import IPIQAConfig
from .device import DEVICE_HELP
from .errors import ConfigError, IPIQAError

if TYPE_CHECKING:
    from .bundle import Manifest


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ipiqa")
@click.option("-v", "--verbose", is_flag=True, help="Log library messages (INFO) to stderr.")
def cli(verbose: bool) -> None:
    """IP-IQA: quality (and prompt alignment) of AI-generated images, given the image and its prompt.

    \b
    Typical flow:
      ipiqa demo                                     # whole path on an untrained model, no downloads
      ipiqa import-official FT.pth --clip RN50.pt -o model.safetensors
      ipiqa score model.safetensors --images images.csv -o scores.csv
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@cli.command("import-official")
@click.argument("finetuned", type=InputPath(dir_okay=False, path_type=Path))
@click.option("--clip", "clip_path", required=True, type=InputPath(dir_okay=False, path_type=Path),
              help="Base CLIP RN50 weights the model was trained from: OpenAI's RN50.pt (TorchScript) or a state_dict.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the model (.safetensors, config in its metadata).")
@click.option("--outputs", default=None, callback=text_option,
              help="Comma-separated score names (default: quality[,alignment]).")
@friendly
def import_official_cmd(finetuned: Path, clip_path: Path, output: Path, outputs: Optional[str]) -> None:
    """Convert an authors' IP-IQA training checkpoint into ipiqa's model file.

    FINETUNED is the .pth their trainer saved ({'model': ..., 'optimizer': ..., 'epoch': ...}). It
    holds only trainable tensors; the frozen text transformer comes from --clip. The config
    (resolution, outputs, head) is read off the tensor shapes. Files are read with
    torch.load(weights_only=True): no arbitrary unpickling.

    \b
    Example:
      ipiqa import-official agiqa3k_best.pth --clip ~/.cache/clip/RN50.pt -o agiqa3k.safetensors
    """
    names = None
    if outputs is not None:
        try:  # checked before torch loads or a file is read
            names = IPIQAConfig.check_outputs([s.strip() for s in outputs.split(",")])
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="'--outputs'") from None
    require_torch()
    from .checkpoint import save_model
    from .official import import_official

    cfg, sd = import_official(finetuned, clip_path, names)
    save_model(output, sd, cfg)
    click.echo(f"wrote {output}: {cfg.resolution}px, outputs={','.join(cfg.outputs)}, head={cfg.head}, "
               f"text={'on' if cfg.text else 'off'}", err=True)


def bundle_summary(manifest: "Manifest") -> dict[str, Any]:
    """What a user asks of a bundle: which model, which precision, built where and with what, and how
    closely it matched the PyTorch reference when exported (the parity results exactly as stored)."""
    engines, onnx = manifest.engines, manifest.onnx
    return {
        "bundle": str(manifest.root),
        "format": manifest.format,
        "config": manifest.config.to_dict(),
        "precision": manifest.precision,
        "graphs": {name: {"onnx": graph.file, "engine": engines.graphs[name].file
                          if engines and name in engines.graphs else None}
                   for name, graph in onnx.graphs.items()},
        "onnx": {"opset": onnx.opset, "precisions": list(onnx.precisions), "pooling": onnx.pooling},
        "engines": {"tensorrt": engines.tensorrt, "gpu": engines.gpu, "compute_capability": engines.compute_capability,
                    "precision": engines.precision, "batch": list(engines.batch)} if engines else None,
        "versions": dict(manifest.versions),
        "parity": manifest.to_dict()["parity"],
    }


@cli.command("info")
@click.argument("target", metavar="MODEL_OR_BUNDLE", type=InputPath(exists=True, path_type=Path))
@friendly
def info_cmd(target: Path) -> None:
    """Print a model file's config, or a bundle folder's summary, as JSON.

    A bundle is verified first (format, ipiqa version, every file's SHA-256), as 'ipiqa score' does;
    the summary shows its config, precision, graphs, TensorRT engines (version, GPU), the versions
    it was built with and its parity results.

    \b
    Examples:
      ipiqa info model.safetensors
      ipiqa info bundle/
    """
    if target.is_dir():
        from .bundle import read_bundle  # torch-free: works on a base install

        click.echo(json.dumps(bundle_summary(read_bundle(target)), indent=2))
        return
    from .checkpoint import read_config  # metadata only: torch-free

    click.echo(read_config(target).to_json())


@contextmanager
def _progress(quiet: bool) -> Iterator[Callable[[list], None]]:
    """A bar over scored rows (img/s) for a run, drawn after half a second and wiped if the run fails: a bad
    manifest or output then ends in its one error line. Yields the ``on_results`` callback."""
    from tqdm import tqdm

    bar = tqdm(unit="img", disable=quiet, file=sys.stderr, dynamic_ncols=True, delay=0.5)
    try:
        yield lambda results: bar.update(len(results))
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()


def run_scoring(scorer, source, output, fmt, batch, workers, quiet, prompt=None, resume=False, fail_fast=False,
                decode="host", fast_decode=False):
    """Shared by ``score`` and ``demo``: progress bar with img/s, incremental writing, summary on stderr."""
    with _progress(quiet) as advance:
        summary = scorer.score_files(source, output, prompt, fmt, batch, workers, resume, fail_fast,
                                     on_results=advance, decode=decode, fast_decode=fast_decode)
    resumed = f", {summary.skipped} already done" if summary.skipped else ""
    click.echo(f"{summary.rows} rows scored ({summary.errors} errors{resumed}) in {summary.seconds:.1f}s, "
               f"{summary.rows / max(summary.seconds, 1e-9):.1f} img/s, backend {scorer.backend.name}, "
               f"prompt cache {scorer.cache.hits} hits / {scorer.cache.misses} misses", err=True)
    return summary


class _ImagesPath(InputPath):
    """``--images``: a path (checked as ``InputPath`` does), or a shard pattern (braces, glob) that RowSource
    expands; a pattern is not a file, so it is passed on as written."""

    def convert(self, value, param, ctx):
        text = os.fsdecode(value) if isinstance(value, (bytes, os.PathLike)) else str(value)
        if set("{}*?[") & set(text) and not os.path.lexists(text):
            return Path(text)
        return super().convert(value, param, ctx)


@click.command("score")
@click.argument("model", required=False, type=InputPath(exists=True, path_type=Path))
@click.option("--images", "--image", "source", required=True, type=_ImagesPath(exists=True, path_type=Path),
              help="A folder of images, one image, a CSV/TSV/JSONL manifest with columns image,prompt, WebDataset "
                   "tar shards ('DIR/{00000..00099}.tar', a glob, a folder of them or a text file listing them; rows "
                   "are named SHARD::KEY) or Parquet files with an image column (rows named FILE::ROW).")
@click.option("--prompt-field", default=None, callback=text_option,
              help="Shards: the field of a sample's .json holding its prompt when it has no .txt [default: prompt].")
@click.option("--image-column", default=None, callback=text_option,
              help="Parquet: the image column: encoded bytes, a {bytes, path} struct (Hugging Face Image) or a path "
                   "[default: image].")
@click.option("--prompt-column", default=None, callback=text_option,
              help="Parquet: the prompt column [default: prompt, when present].")
@click.option("--prompt", default=None, callback=text_option,
              help="Prompt for images without one (a folder, one image, empty cells).")
@click.option("-o", "--output", default="-", show_default=True, help="Output file (.csv, .jsonl or .parquet; Parquet needs ipiqa[parquet] "
              "and cannot be resumed), '-' for stdout.")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="One output file per input shard or Parquet file (OUT/NAME.csv, or --format), renamed into place "
                   "only when complete: a rerun skips complete ones (and continues a shard a killed run left "
                   "half-written: --resume is implied), and runs on several machines sharing the list and the folder "
                   "score each shard once.")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl", "parquet"]), default=None,
              help="Output format (default: from the file suffix, else csv).")
@click.option("--backend", type=click.Choice(["auto", "tensorrt", "onnxruntime", "openvino", "torch"]), default="auto",
              show_default=True, help="auto: TensorRT engines > onnxruntime GPU > on CPU the fastest gated choice "
              "(openvino BF16, else onnxruntime INT8/FP32; torch for MODEL files). openvino: ipiqa[openvino], CPU.")
@click.option("--device", default="auto", show_default=True, callback=device_option, help=DEVICE_HELP)
@click.option("--batch", default=8, show_default=True, type=click.IntRange(1), help="Images per forward pass.")
@click.option("--workers", default=min(8, os.cpu_count() or 1), show_default=True, type=click.IntRange(1),
              help="Threads decoding images ahead of inference.")
@click.option("--decode", type=click.Choice(["host", "device"]), default="host", show_default=True,
              help="host: decode + exact resize in --workers threads. device: the torch backend (MODEL file) decodes "
                   "JPEGs on the GPU (nvJPEG) and resizes there with Pillow's exact arithmetic; nvJPEG's IDCT may "
                   "differ from libjpeg's by a few levels (the benchmark measures the score difference).")
@click.option("--fast-decode", is_flag=True,
              help="Opt-in, NOT exact: JPEGs decoded at a reduced DCT scale plus Pillow's reducing_gap. Measured on "
                   "the 2-core CI machine: 3.5x the exact path per core on 1024 and 2048 px JPEGs (max 13 and 7, "
                   "mean 1.1 and 0.9 levels of pixel difference); no change below 2x the resolution. "
                   "Score deviation: README 'Speed'.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16", "int8"]), default="auto",
              show_default=True,
              help="Which of the bundle's graphs run. auto: on CPU the fastest choice the bundle's gates and the CPU "
                   "allow (BF16 on openvino, else INT8 or FP32); the FP16 graphs on onnxruntime GPU when the bundle "
                   "has them; the engines' own precision on TensorRT. bf16: the FP32 graphs with BF16 inference on "
                   "openvino, on CPUs with AMX or AVX512-BF16 (export with --bf16). int8: the bundle's INT8 image "
                   "graph on CPU (export with --int8 --calibration), or INT8 TensorRT engines. fp16: GPUs only. A "
                   "precision the bundle or device cannot serve is refused with the command that builds it.")
@click.option("--fp16", is_flag=True, help="Half precision for the torch backend on CUDA.")
@click.option("--compile", "compile_", is_flag=True, help="torch backend: torch.compile the image encoder (CUDA graphs on GPU).")
@click.option("--resume", is_flag=True, help="Skip the rows the output file already holds; append the rest.")
@click.option("--fail-fast", is_flag=True, help="Stop at the first row that cannot be scored.")
@click.option("--allow-errors", is_flag=True, help=f"Exit 0 even when rows failed (default: exit {EXIT_ROW_ERRORS}).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Score on a Ray cluster (ADDRESS, or a local one): decode in CPU tasks, one scorer per GPU.")
@click.option("--server", default=None, callback=text_option, metavar="HOST:PORT",
              help="Score on a running 'ipiqa serve' (or the NGC ensemble) at its gRPC address instead of a local "
                   "MODEL: each row's image file is sent as one request; same output rows, --resume included.")
@click.option("--concurrency", default=8, show_default=True, type=click.IntRange(1),
              help="--server: requests in flight at once.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@friendly
def score_cmd(model, source, prompt_field, image_column, prompt_column, prompt, output, output_dir, fmt, backend, device,
              batch, workers, decode, fast_decode, precision, fp16, compile_, resume, fail_fast, ray_address, allow_errors,
              server, concurrency, quiet) -> None:
    """Score images with an exported BUNDLE folder (runtime, no torch) or a MODEL .safetensors file.

    Every input row gets one output row, in input order: the scores, or an 'error' cell naming the
    cause (missing file, corrupt image, missing prompt). Rows are flushed as they finish, so an
    interrupted run keeps them and --resume continues where it stopped.

    \b
    Exit status: 0 all rows scored; 1 the run could not start (bad bundle, bad manifest);
    3 the run finished but some rows are errors (see --allow-errors).

    \b
    Examples:
      ipiqa score bundle/ --images photos/ --prompt "a red fox in snow" -o scores.csv
      ipiqa score bundle/ --images data.csv -o scores.jsonl --device cuda --batch 64 --resume
      ipiqa score model.safetensors --images data.csv --backend torch --device cuda --fp16 --decode device
      ipiqa score bundle/ --images data.csv -o scores.csv --device cpu --precision int8
      ipiqa score bundle/ --images data.csv -o scores.csv --ray ray://head:10001
      ipiqa score bundle/ --images 'shards/{00000..04999}.tar' --output-dir scores/ --prompt-field caption
      ipiqa score bundle/ --images train.parquet --prompt-column text -o scores.jsonl
      ipiqa score --server localhost:8001 --images data.csv -o scores.csv --concurrency 16 --resume
    """
    from ipiqa.runtime.io import RowSource

    if output_dir is not None and str(output) != "-":
        raise IPIQAError("give -o FILE (one output) or --output-dir DIR (one output per shard), not both")
    options = dict(prompt_field=prompt_field, image_column=image_column, prompt_column=prompt_column)
    if server is not None or model is None:
        _score_remote(model, server, RowSource(source, prompt, **options), output, output_dir, fmt, batch, concurrency,
                      quiet, resume, fail_fast, allow_errors,
                      local=dict(backend=backend != "auto", device=device != "auto", decode=decode != "host",
                                 fast_decode=fast_decode, precision=precision != "auto", fp16=fp16, compile=compile_,
                                 ray=ray_address is not None))
        return
    if ray_address is not None:
        require("ray", extra="ray")
        from ipiqa.runtime.distributed import score_with_ray

        if precision != "auto":
            raise IPIQAError("--ray scores with each worker's automatic precision; drop --precision (or score without --ray)")
        if (resume and output_dir is None) or fail_fast or (str(output) == "-" and output_dir is None) \
                or decode != "host" or fast_decode:
            raise IPIQAError("--ray writes a file (-o scores.csv/.jsonl/.parquet) or --output-dir, and does not take "
                             "--resume (with --output-dir complete shards are always skipped), --fail-fast, "
                             "--decode device or --fast-decode")
        rows = RowSource(source, prompt, **options)
        summary = score_with_ray(model, rows, output_dir if output_dir is not None else output, None, ray_address,
                                 batch_size=batch, backend=backend, device=device, fmt=fmt,
                                 per_partition=output_dir is not None)
        if output_dir is not None:
            _partitions_line(summary, output_dir, "on Ray ")
        else:
            click.echo(f"{summary.rows} rows scored on Ray ({summary.errors} errors) in {summary.seconds:.1f}s", err=True)
        if summary.errors and not allow_errors:
            sys.exit(EXIT_ROW_ERRORS)
        return

    from ipiqa.runtime.scorer import Scorer

    with Scorer(model, backend=backend, device=device, fp16=fp16, compile=compile_, precision=precision) as scorer:
        rows = RowSource(source, prompt, **options)
        if output_dir is not None:  # --resume is what --output-dir always does: complete shards are skipped
            summary = _score_partitions(scorer, rows, output_dir, fmt, batch, workers, quiet, fail_fast, decode,
                                        fast_decode)
        else:
            summary = run_scoring(scorer, rows, output, fmt, batch, workers, quiet, None, resume, fail_fast, decode,
                                  fast_decode)
    if summary.errors and not allow_errors:
        sys.exit(EXIT_ROW_ERRORS)


def _score_remote(model, server, rows, output, output_dir, fmt, batch, concurrency, quiet, resume, fail_fast,
                  allow_errors, local: dict) -> None:
    """``score --server``: the rows scored by a running server (``runtime.serve.client``), written as a local run."""
    if server is None:
        raise IPIQAError("give a MODEL (bundle folder or .safetensors) or --server HOST:PORT")
    if model is not None:
        raise IPIQAError(f"--server scores with the server's bundle; drop MODEL ({model}) or drop --server")
    given = [f"--{k.replace('_', '-')}" for k, v in local.items() if v]
    if given or output_dir is not None:
        raise IPIQAError(f"{', '.join(given + (['--output-dir'] if output_dir is not None else []))}: local scoring "
                         "options; with --server the server's backend, device and decoding apply: drop them")
    from ipiqa.runtime.serve.client import RemoteScorer

    with RemoteScorer(server, concurrency=concurrency) as scorer:
        summary = run_scoring(scorer, rows, output, fmt, batch, 1, quiet, None, resume, fail_fast)
    if summary.errors and not allow_errors:
        sys.exit(EXIT_ROW_ERRORS)


def _score_partitions(scorer, rows, output_dir, fmt, batch, workers, quiet, fail_fast, decode, fast_decode):
    """``score --output-dir``: one file per shard (``runtime.io.partitions``), a progress bar over rows."""
    from ipiqa.runtime.io.partitions import score_partitions

    with _progress(quiet) as advance:
        summary = score_partitions(scorer, rows, output_dir, fmt, batch, workers, fail_fast, on_results=advance,
                                   decode=decode, fast_decode=fast_decode)
    _partitions_line(summary, output_dir, f"backend {scorer.backend.name}, ")
    return summary


def _partitions_line(summary, output_dir, where: str) -> None:
    busy = f", {summary.busy} being scored by another run" if summary.busy else ""
    click.echo(f"{summary.partitions} shards into {output_dir}: {summary.scored} scored now ({summary.rows} rows, "
               f"{summary.errors} errors), {summary.complete} already complete{busy}; {where}"
               f"{summary.seconds:.1f}s", err=True)


cli.add_command(score_cmd)


from ipiqa.runtime.report.commands import report_cmd, select_cmd  # noqa: E402 (click only; numpy/PIL load inside)
from ipiqa.runtime.serve.commands import serve_cmd  # noqa: E402 (click only; pytriton loads inside)

cli.add_command(serve_cmd)

cli.add_command(report_cmd)
cli.add_command(select_cmd)


@cli.command("demo")
@click.option("--out", default="ipiqa-demo", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the demo model, bundle, sample images and scores.")
@click.option("--resolution", default=512, show_default=True, type=int, help="Input resolution (512 as in the paper).")
@friendly
def demo_cmd(out: Path, resolution: int) -> None:
    """Run the whole path on a seeded UNTRAINED model and generated images: no weights, GPU or network.

    \b
    1. torch:     OUT/model.safetensors scored by the PyTorch backend   -> OUT/scores_torch.csv
    2. export:    ipiqa-export to OUT/bundle (ONNX graphs + parity gate)
    3. runtime:   the bundle scored by the torch-free runtime (ONNX Runtime) -> OUT/scores_runtime.csv
    The table shows both scores per image and their difference. The scores themselves are meaningless
    (random weights); the broken file shows how a bad input is reported without losing other rows.
    """
    import csv

    try:  # the value first (torch-free), then what the demo needs
        cfg = IPIQAConfig(resolution=resolution)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="'--resolution'") from None
    # Checked before any work: the demo runs the PyTorch backend, then exports (the [export] extra).
    torch = require("torch", extra="export")
    for module in ("open_clip", "onnx", "onnxscript"):
        require(module, extra="export")

    from ipiqa.export.bundle_export import ExportOptions, export_bundle
    from ipiqa.runtime.scorer import Scorer

    from .checkpoint import save_model
    from .demo import demo_model, write_samples

    torch.set_num_threads(os.cpu_count() or 1)
    model = demo_model(cfg)
    model_path = save_model(out / "model.safetensors", model.state_dict(), cfg)
    manifest = write_samples(out / "images")
    # Step 1 is the torch backend (``TorchBackend``), not the reference eager model: columns say "torch".
    click.echo(f"[1/3] torch: UNTRAINED CLIP RN50 IP-IQA ({resolution}px, seed 0) on {manifest}", err=True)
    with Scorer(model_path, backend="torch", device="cpu") as scorer:
        run_scoring(scorer, manifest, out / "scores_torch.csv", None, 4, 4, quiet=True)
    click.echo(f"[2/3] export: ONNX bundle -> {out}/bundle", err=True)
    report = export_bundle(model, [model_path], out / "bundle", ExportOptions(onnx_only=True),
                           progress=lambda m: click.echo(f"      {m}", err=True))
    click.echo("[3/3] runtime: the bundle on ONNX Runtime (no torch)", err=True)
    with Scorer(out / "bundle", backend="onnxruntime", device="cpu") as scorer:
        run_scoring(scorer, manifest, out / "scores_runtime.csv", None, 4, 4, quiet=True)

    def load(name):
        with open(out / name, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    first, rt = load("scores_torch.csv"), load("scores_runtime.csv")
    rows, worst = [], 0.0
    for a, b in zip(first, rt):
        cells: list = [Path(a["image"]).name]
        diffs = []
        for o in cfg.outputs:
            x, y = (float(a[o]) if a[o] else None), (float(b[o]) if b[o] else None)
            cells += [x, y]
            if x is not None and y is not None:
                diffs.append(abs(x - y))
        worst = max([worst, *diffs])
        cells += [f"{max(diffs):.1e}" if diffs else "", a["error"].split(": ", 1)[-1][:60]]
        rows.append(cells)
    header = ["image"] + [f"{o} ({w})" for o in cfg.outputs for w in ("torch", "runtime")] + ["max |diff|", "error"]
    click.echo(format_table(header, rows))
    gate = next(r for r in report.parity if r.name == "end_to_end/scores")
    click.echo(f"\ntorch vs runtime: max |diff| {worst:.1e}; export gate end-to-end {gate.max_abs:.1e} "
               f"(tolerance {gate.tolerance:.0e}). Untrained weights: the numbers only show that the path works; "
               "import trained weights with 'ipiqa import-official'.", err=True)


def _add_train() -> None:
    from ipiqa.training.cli import train  # click only: torch loads inside the commands

    cli.add_command(train)


_add_train()


def main(argv: Optional[Sequence[str]] = None) -> None:
    cli.main(args=argv, prog_name="ipiqa")


def score_main(argv: Optional[Sequence[str]] = None) -> None:
    """``ipiqa-score``: the same as ``ipiqa score``."""
    score_cmd.main(args=argv, prog_name="ipiqa-score")


if __name__ == "__main__":  # pragma: no cover
    main()
