"""``ipiqa`` command line. Heavy imports (torch, onnx) live inside command bodies so ``--help`` is instant."""
from __future__ import annotations

import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import click

from .errors import IPIQAError

EXIT_ROW_ERRORS = 3


def _friendly(fn: Callable) -> Callable:
    """Expected failures print one line naming the file and the fix, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except IPIQAError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in header]] + [["" if c is None else (f"{c:.4f}" if isinstance(c, float) else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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
@click.argument("finetuned", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--clip", "clip_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Base CLIP RN50 weights the model was trained from: OpenAI's RN50.pt (TorchScript) or a state_dict.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the model (.safetensors, config in its metadata).")
@click.option("--outputs", default=None, help="Comma-separated score names (default: quality[,alignment]).")
@_friendly
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
    from .checkpoint import save_model
    from .official import import_official

    names = [s.strip() for s in outputs.split(",")] if outputs else None
    cfg, sd = import_official(finetuned, clip_path, names)
    save_model(output, sd, cfg)
    click.echo(f"wrote {output}: {cfg.resolution}px, outputs={','.join(cfg.outputs)}, head={cfg.head}, "
               f"text={'on' if cfg.text else 'off'}", err=True)


@cli.command("info")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_friendly
def info_cmd(model: Path) -> None:
    """Print a model file's config as JSON."""
    from .checkpoint import read_config

    click.echo(read_config(model).to_json())


def run_scoring(scorer, rows, output, fmt, batch, workers, quiet) -> "object":
    """Shared by ``score`` and ``demo``: progress bar, incremental writing, summary line on stderr."""
    from tqdm import tqdm

    from ipiqa.runtime.io import ResultWriter
    from ipiqa.runtime.pipeline import score_rows

    start = time.perf_counter()
    with ResultWriter(output, scorer.cfg.outputs, fmt) as writer, \
            tqdm(total=len(rows), unit="img", disable=quiet, file=sys.stderr, dynamic_ncols=True) as bar:
        def on_results(results):
            writer.write(results)
            bar.update(len(results))

        summary = score_rows(rows, scorer, batch_size=batch, workers=workers, on_results=on_results)
    seconds = time.perf_counter() - start
    click.echo(f"{summary.rows} rows, {summary.errors} errors, {summary.rows / max(seconds, 1e-9):.1f} img/s", err=True)
    return summary


@cli.command("score")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--images", "source", required=True, type=click.Path(exists=True, path_type=Path),
              help="A folder of images, one image, or a CSV/TSV/JSONL manifest with columns image,prompt.")
@click.option("--prompt", default=None, help="Prompt for images without one (a folder, or empty manifest cells).")
@click.option("-o", "--output", default="-", show_default=True, help="Output file (.csv or .jsonl), '-' for stdout.")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default=None,
              help="Output format (default: from the file suffix, else csv).")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(1), help="Images per forward pass.")
@click.option("--workers", default=min(8, os.cpu_count() or 1), show_default=True, type=click.IntRange(1),
              help="Threads decoding images.")
@click.option("--device", default="cpu", show_default=True, help="torch device: cpu, cuda, cuda:1 ...")
@click.option("--fp16", is_flag=True, help="Half precision (CUDA only).")
@click.option("--allow-errors", is_flag=True, help=f"Exit 0 even when rows failed (default: exit {EXIT_ROW_ERRORS}).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_friendly
def score_cmd(model, source, prompt, output, fmt, batch, workers, device, fp16, allow_errors, quiet) -> None:
    """Score images with a model file (.safetensors) on the PyTorch reference.

    Every input row gets one output row, in input order: the scores, or an 'error' cell naming the
    cause (missing file, corrupt image, missing prompt). Rows are flushed as they finish.

    \b
    Exit status: 0 all rows scored; 1 the run could not start (bad model, bad manifest);
    3 the run finished but some rows are errors (see --allow-errors).

    \b
    Examples:
      ipiqa score model.safetensors --images photos/ --prompt "a red fox in snow" -o scores.csv
      ipiqa score model.safetensors --images data.csv -o scores.jsonl --device cuda --fp16 --batch 64
    """
    from ipiqa.runtime.io import read_rows

    from .checkpoint import load_model
    from .reference import TorchScorer

    scorer = TorchScorer(load_model(model), device=device, fp16=fp16)
    rows = read_rows(source, prompt)
    if scorer.needs_prompt and all(r.prompt is None for r in rows):
        raise IPIQAError(f"{source}: no prompts; this model scores an image against its prompt: pass --prompt "
                         "TEXT or a manifest with a 'prompt' column")
    summary = run_scoring(scorer, rows, output, fmt, batch, workers, quiet)
    if summary.errors and not allow_errors:
        sys.exit(EXIT_ROW_ERRORS)


@cli.command("demo")
@click.option("--out", default="ipiqa-demo", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the demo model, sample images and scores.")
@click.option("--resolution", default=512, show_default=True, type=int, help="Input resolution (512 as in the paper).")
@_friendly
def demo_cmd(out: Path, resolution: int) -> None:
    """Run the whole path on a seeded UNTRAINED model and generated images: no weights, GPU or network.

    Writes OUT/model.safetensors, OUT/images/ (six pictures, their prompts, one broken file) and
    OUT/scores.csv, and prints the table. The scores are meaningless (random weights); the broken
    file shows how a bad input is reported without losing the other rows.
    """
    import csv

    import torch

    from ipiqa.runtime.io import read_rows

    from .checkpoint import load_model, save_model
    from .config import IPIQAConfig
    from .demo import demo_model, write_samples
    from .reference import TorchScorer

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = IPIQAConfig(resolution=resolution)
    click.echo(f"[1/3] building an UNTRAINED demo model (CLIP RN50, {resolution}px, seed 0) -> {out}/model.safetensors", err=True)
    model_path = save_model(out / "model.safetensors", demo_model(cfg).state_dict(), cfg)
    manifest = write_samples(out / "images")
    click.echo(f"[2/3] wrote sample images and {manifest}", err=True)
    click.echo("[3/3] scoring with the PyTorch reference", err=True)
    rows = read_rows(manifest)
    run_scoring(TorchScorer(load_model(model_path)), rows, out / "scores.csv", None, 4, 4, quiet=False)

    with open(out / "scores.csv", newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    cols = ["image", *cfg.outputs, "error"]
    click.echo(format_table(cols, [[Path(r["image"]).name, *[float(r[o]) if r[o] else None for o in cfg.outputs],
                                    r["error"]] for r in table]))
    click.echo("\nUntrained weights: these numbers only show that the path works. "
               "Import trained weights with 'ipiqa import-official'.", err=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    cli.main(args=argv, prog_name="ipiqa")


if __name__ == "__main__":  # pragma: no cover
    main()
