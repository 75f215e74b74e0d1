"""``ipiqa`` command line. Heavy imports (torch, onnx) live inside command bodies so ``--help`` is instant."""
from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import click

from .console import EXIT_ROW_ERRORS, ImagesPath, InputPath, device_option, friendly, format_table, text_option
from ._optional import require, require_torch
from .config import IPIQAConfig
from .device import DEVICE_HELP
from .errors import ConfigError, IPIQAError
from ipiqa.runtime.cpu import usable_cores

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


class _Progress:
    """The console's bar for a run: rows done out of the input's rows when that count is cheap (``RowSource.count``:
    a listed folder, Parquet footers, a manifest's lines), with the time left; rows and img/s otherwise. A per-shard
    run (``--output-dir``) counts shards done out of its shards, its rows and rate beside them."""

    def __init__(self, bar, per_partition: bool):
        self.bar, self.per_partition, self.rows = bar, per_partition, 0

    def results(self, results: list) -> None:
        if not self.per_partition:
            self.bar.update(len(results))
            return
        self.rows += len(results)
        elapsed = self.bar.format_dict.get("elapsed") or 0.0
        self.bar.set_postfix_str(f"{self.rows} img, {self.rows / elapsed if elapsed else 0:.1f} img/s")

    def partition(self, _result: Any = None) -> None:
        self.bar.update(1)


@contextmanager
def _progress(quiet: bool, total: Optional[int] = None, partitions: Optional[int] = None) -> Iterator[_Progress]:
    """A bar drawn after half a second and wiped if the run fails: a bad manifest or output then ends in its one
    error line. ``total``: the rows to score, when known; ``partitions``: a per-shard run's shards (its bar counts
    shards)."""
    from tqdm import tqdm

    per_partition = partitions is not None
    bar = tqdm(total=partitions if per_partition else total, unit="shard" if per_partition else "img",
               disable=quiet, file=sys.stderr, dynamic_ncols=True, delay=0.5)
    try:
        yield _Progress(bar, per_partition)
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()


def _count(rows) -> Optional[int]:
    count = getattr(rows, "count", None)
    return count() if callable(count) else None


def run_scoring(scorer, source, output, fmt, batch, workers, quiet, prompt=None, resume=False, fail_fast=False,
                decode="host", fast_decode=False):
    """Shared by ``score`` (file, ``--server``) and ``demo``: the bar, incremental writing, one summary line."""
    from ipiqa.runtime.io import RowSource

    rows = source if isinstance(source, RowSource) else RowSource(source, prompt)
    with _progress(quiet, _count(rows)) as progress:
        summary = scorer.score_files(rows, output, None, fmt, batch, workers, resume, fail_fast,
                                     on_results=progress.results, decode=decode, fast_decode=fast_decode)
    resumed = f", {summary.skipped} already done" if summary.skipped else ""
    click.echo(f"{summary.rows} rows of {rows.describe()} scored ({summary.errors} errors{resumed}) in "
               f"{summary.seconds:.1f}s, {summary.rows / max(summary.seconds, 1e-9):.1f} img/s, backend "
               f"{scorer.backend.name}, prompt cache {scorer.cache.hits} hits / {scorer.cache.misses} misses", err=True)
    return summary


@click.command("score")
@click.argument("model", required=False, type=InputPath(exists=True, path_type=Path))
@click.option("--images", "--image", "source", required=True, type=ImagesPath(exists=True, path_type=Path),
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
@click.option("--workers", default=min(8, usable_cores()), show_default=True, type=click.IntRange(1),
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
@click.option("--reproducible", is_flag=True,
              help="GPU: run every engine call at one fixed batch, so a row's score never depends on --batch, the last "
                   "short batch, a resume or the prompt mix (costs padding on short batches). On the CPU it always is. "
                   "Behind 'ipiqa serve' the server's own setting applies.")
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
@click.option("--server-retry", "server_retry", default=None, type=click.FloatRange(0), metavar="SECONDS",
              help="--server: seconds (default 60) a call failing for the connection (server down, restarting, draining) is "
                   "retried before the run stops, its rows so far intact; then rerun the same command with --resume.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@friendly
def score_cmd(**options: Any) -> None:
    """Score images with an exported BUNDLE folder (runtime, no torch) or a MODEL .safetensors file.

    Every input row gets one output row, in input order: the scores, or an 'error' cell naming the
    cause (missing file, corrupt image, missing prompt). Rows are flushed as they finish, so an
    interrupted run keeps them and --resume continues where it stopped. A manifest's image cell may
    name a shard sample or a Parquet row as score and select write them (SHARD::KEY, FILE::ROW).

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
      ipiqa score bundle/ --images selected.csv -o rescored.csv   # rows naming SHARD::KEY or FILE::ROW
      ipiqa score --server localhost:8001 --images data.csv -o scores.csv --concurrency 16 --resume
    """
    args = ScoreArgs(**options)
    if args.output_dir is not None and str(args.output) != "-":
        raise IPIQAError("give -o FILE (one output) or --output-dir DIR (one output per shard), not both")
    summary = _score_mode(args)(args)
    if summary.errors and not args.allow_errors:
        sys.exit(EXIT_ROW_ERRORS)


@dataclass(frozen=True)
class ScoreArgs:
    """``ipiqa score``'s options, one record for every mode: a new option is a click option above and a field here,
    read by the mode functions that take it (and refused by ``_refuse`` in those that do not)."""

    model: Optional[Path]
    source: Path
    prompt_field: Optional[str]
    image_column: Optional[str]
    prompt_column: Optional[str]
    prompt: Optional[str]
    output: str
    output_dir: Optional[Path]
    fmt: Optional[str]
    backend: str
    device: str
    batch: int
    workers: int
    decode: str
    fast_decode: bool
    precision: str
    fp16: bool
    compile_: bool
    reproducible: bool
    resume: bool
    fail_fast: bool
    ray_address: Optional[str]
    allow_errors: bool
    server: Optional[str]
    concurrency: int
    server_retry: Optional[float]
    quiet: bool

    def rows(self):
        """The input as every mode reads it (``RowSource``: checked before any row is scored)."""
        from ipiqa.runtime.io import RowSource

        return RowSource(self.source, self.prompt, prompt_field=self.prompt_field, image_column=self.image_column,
                         prompt_column=self.prompt_column)

    def local_options(self) -> list[str]:
        """The local-scoring options given (not at their defaults), as the user typed them."""
        given = dict(backend=self.backend != "auto", device=self.device != "auto", decode=self.decode != "host",
                     fast_decode=self.fast_decode, precision=self.precision != "auto", fp16=self.fp16,
                     compile=self.compile_, reproducible=self.reproducible, ray=self.ray_address is not None)
        return [f"--{k.replace('_', '-')}" for k, v in given.items() if v]


def _score_mode(args: ScoreArgs) -> Callable[[ScoreArgs], Any]:
    """Which of the four ways to score this is: a server, a Ray cluster, one file per shard, or one file."""
    if args.server is not None or args.model is None:
        return _score_on_server
    if args.ray_address is not None:
        return _score_on_ray
    return _score_into_folder if args.output_dir is not None else _score_into_file


def _score_into_file(args: ScoreArgs):
    """``score MODEL --images X -o FILE``: one output file (or stdout), resumable."""
    from ipiqa.runtime.scorer import Scorer

    with Scorer(args.model, backend=args.backend, device=args.device, fp16=args.fp16, compile=args.compile_,
                precision=args.precision, reproducible=args.reproducible) as scorer:
        return run_scoring(scorer, args.rows(), args.output, args.fmt, args.batch, args.workers, args.quiet, None,
                           args.resume, args.fail_fast, args.decode, args.fast_decode)


def _score_into_folder(args: ScoreArgs):
    """``score MODEL --images X --output-dir DIR``: one file per shard or Parquet file (``runtime.io.partitions``;
    a manifest or folder is one partition, written as DIR/<its name>.csv). --resume is what it always does:
    complete shards are skipped, a half-written one continued."""
    from ipiqa.runtime.io.partitions import score_partitions
    from ipiqa.runtime.scorer import Scorer

    with Scorer(args.model, backend=args.backend, device=args.device, fp16=args.fp16, compile=args.compile_,
                precision=args.precision, reproducible=args.reproducible) as scorer:
        rows = args.rows()
        with _progress(args.quiet, partitions=len(rows.partitions)) as progress:
            summary = score_partitions(scorer, rows, args.output_dir, args.fmt, args.batch, args.workers,
                                       args.fail_fast, on_results=progress.results, on_partition=progress.partition,
                                       decode=args.decode, fast_decode=args.fast_decode)
        _partitions_line(summary, rows, args.output_dir, f"backend {scorer.backend.name}, ")
    return summary


def _score_on_ray(args: ScoreArgs):
    """``score MODEL --ray [ADDRESS]``: decode in CPU tasks, one scorer per GPU; into a file or, with
    --output-dir, one Ray task per shard."""
    require("ray", extra="ray")
    from ipiqa.runtime.distributed import score_with_ray

    if args.precision != "auto":
        raise IPIQAError("--ray scores with each worker's automatic precision; drop --precision (or score without --ray)")
    if (args.resume and args.output_dir is None) or args.fail_fast or (str(args.output) == "-" and args.output_dir is None) \
            or args.decode != "host" or args.fast_decode:
        raise IPIQAError("--ray writes a file (-o scores.csv/.jsonl/.parquet) or --output-dir, and does not take "
                         "--resume (with --output-dir complete shards are always skipped), --fail-fast, "
                         "--decode device or --fast-decode")
    rows = args.rows()
    per_partition = args.output_dir is not None
    with _progress(args.quiet, _count(rows), len(rows.partitions) if per_partition else None) as progress:
        summary = score_with_ray(args.model, rows, args.output_dir if per_partition else args.output, None,
                                 args.ray_address, batch_size=args.batch, backend=args.backend, device=args.device,
                                 fmt=args.fmt, per_partition=per_partition, on_results=progress.results,
                                 on_partition=progress.partition, reproducible=args.reproducible)
    if per_partition:
        _partitions_line(summary, rows, args.output_dir, "on Ray ")
    else:
        click.echo(f"{summary.rows} rows of {rows.describe()} scored on Ray ({summary.errors} errors) in "
                   f"{summary.seconds:.1f}s, {summary.rows / max(summary.seconds, 1e-9):.1f} img/s", err=True)
    return summary


def _score_on_server(args: ScoreArgs):
    """``score --server HOST:PORT``: the rows scored by a running server (``runtime.serve.client``), written as a
    local run writes them."""
    if args.server is None:
        raise IPIQAError("give a MODEL (bundle folder or .safetensors) or --server HOST:PORT")
    if args.model is not None:
        raise IPIQAError(f"--server scores with the server's bundle; drop MODEL ({args.model}) or drop --server")
    given = args.local_options() + (["--output-dir"] if args.output_dir is not None else [])
    if given:
        raise IPIQAError(f"{', '.join(given)}: local scoring options; with --server the server's backend, device "
                         "and decoding apply: drop them")
    from ipiqa.runtime.serve.client import RemoteScorer

    rows = args.rows()
    with RemoteScorer(args.server, concurrency=args.concurrency, retry_s=args.server_retry) as scorer:
        return run_scoring(scorer, rows, args.output, args.fmt, args.batch, 1, args.quiet, None, args.resume,
                           args.fail_fast)


_PARTITION_NOUN = {"shards": ("tar shard", "tar shards"), "parquet": ("Parquet file", "Parquet files")}


def _partitions_line(summary, rows, output_dir, where: str) -> None:
    """One line per ``--output-dir`` run, in the words of its input kind (shards, Parquet files, a manifest)."""
    one, many = _PARTITION_NOUN.get(rows.kind, (rows.kind if rows.kind != "csv" else "manifest",) * 2)
    noun = one if summary.partitions == 1 else many
    busy = f", {summary.busy} being scored by another run" if summary.busy else ""
    click.echo(f"{summary.partitions} {noun} into {output_dir}: {summary.scored} scored now ({summary.rows} rows, "
               f"{summary.errors} errors), {summary.complete} already complete{busy}; {where}"
               f"{summary.seconds:.1f}s", err=True)


cli.add_command(score_cmd)


from ipiqa.runtime.results.commands import report_cmd, select_cmd  # noqa: E402 (click only; numpy/PIL load inside)
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

    torch.set_num_threads(usable_cores())
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
