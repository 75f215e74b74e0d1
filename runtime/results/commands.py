"""The ``ipiqa report`` and ``ipiqa select`` commands (click only; registered by ``ipiqa/cli.py``)."""
from __future__ import annotations

import sys
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import click

from ipiqa.console import friendly, text_option

__all__ = ["report_cmd", "select_cmd"]

SCORES = click.argument("scores", metavar="SCORES", callback=text_option)  # a file, folder, list or pattern: sets.py
IMAGES_ROOT = click.option(
    "--images-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
    help="Folder the scores file's relative image paths are under (default: the current folder, as in the scoring "
         "run; use it when you run from elsewhere or the images moved).")


@contextmanager
def _rows_bar(quiet: bool) -> Iterator[Callable[[int], None]]:
    """A progress bar of rows read (the total of a scores set is not known without reading it); yields the
    callback the commands call with the rows read so far."""
    from tqdm import tqdm

    bar = tqdm(unit="row", disable=quiet, file=sys.stderr, dynamic_ncols=True, delay=0.5, desc="reading")
    state = {"last": 0}

    def progress(rows: int) -> None:
        bar.update(rows - state["last"])
        state["last"] = rows

    try:
        yield progress
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()


@click.command("report")
@SCORES
@click.option("-o", "--output", default="report.html", show_default=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The HTML page to write (one file; thumbnails embedded).")
@IMAGES_ROOT
@click.option("--bundle", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The bundle that wrote the scores: its precision and build are shown in the summary (the scores "
                   "file itself does not record them).")
@click.option("--by", default=None, callback=text_option, help="The output that ranks images (default: the first, quality).")
@click.option("-n", "--worst-best", "n", default=24, show_default=True, type=click.IntRange(0), help="Worst and best images shown.")
@click.option("--sample", default=96, show_default=True, type=click.IntRange(0), help="Images in the filterable gallery (uniform sample).")
@click.option("--prompts", default=12, show_default=True, type=click.IntRange(0), help="Prompts shown ranked (widest spread first).")
@click.option("--per-prompt", default=8, show_default=True, type=click.IntRange(0), help="Images shown per prompt, best first.")
@click.option("--errors", default=100, show_default=True, type=click.IntRange(0), help="Error rows listed (all are counted by cause).")
@click.option("--thumb", default=160, show_default=True, type=click.IntRange(16, 1024), help="Thumbnail size in pixels (longest side).")
@click.option("--title", default=None, callback=text_option, help="The page's title.")
@click.option("--shard-previews", is_flag=True,
              help="Rows inside shards (SHARD::KEY): read their thumbnails from the shards. Each shard holding a "
                   "shown row is streamed once, up to its last shown key (off by default: that can be many GB).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@friendly
def report_cmd(scores: str, output: Path, images_root: Optional[Path], bundle: Optional[Path], by: Optional[str],
               n: int, sample: int, prompts: int, per_prompt: int, errors: int, thumb: int, title: Optional[str],
               shard_previews: bool, quiet: bool) -> None:
    """Write one offline HTML page about a scores file or set: summary, histograms, worst and best images, best
    of N per prompt, errors, and a threshold control that filters the galleries.

    SCORES is what 'ipiqa score' wrote: one .csv, .jsonl or .parquet file; or a scores set read as one file:
    the --output-dir folder of a run over shards (its complete files; partial ones are left out and counted), a
    glob or brace pattern of score files ('scores/*.csv'), or a text file listing them one a line. Every file
    of a set must have the same score columns (csv, jsonl and parquet may mix). It is streamed (twice: the second pass
    only ranks the shown prompts' images), so a million rows take seconds and the page stays a few MB: every
    histogram counts all rows, the galleries show bounded samples. Open the page in any browser, offline;
    append #quality=0.6 to its URL to open it at that threshold.

    \b
    Examples:
      ipiqa report scores.csv -o report.html
      ipiqa report scores/ -o report.html                 # the --output-dir folder of a run over shards
      ipiqa report scores.jsonl -o report.html --bundle bundle/ --images-root /data/images
      ipiqa report scores.parquet -o report.html --by alignment -n 48 --per-prompt 4
    """
    from .build import write_report
    from .collect import ReportOptions

    options = ReportOptions(by=by, n=n, sample=sample, prompts=prompts, per_prompt=per_prompt, errors=errors)
    with _rows_bar(quiet) as progress:
        result = write_report(scores, output, options, images_root, bundle, title, thumb, progress, shard_previews)
    click.echo(f"wrote {result.path}: {result.rows:,} rows ({result.errors:,} errors), {result.thumbnails} thumbnails, "
               f"{result.bytes / 1e6:.2f} MB in {result.seconds:.1f}s", err=True)


@click.command("select")
@SCORES
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="The manifest to write: .csv or .jsonl (image, prompt, the scores). Needed unless --to-shards.")
@click.option("--min", "mins", multiple=True, metavar="OUTPUT=VALUE", callback=text_option,
              help="Keep rows with OUTPUT >= VALUE (repeat for several outputs; all must hold).")
@click.option("--max", "maxs", multiple=True, metavar="OUTPUT=VALUE", callback=text_option,
              help="Keep rows with OUTPUT <= VALUE.")
@click.option("--top-k", type=click.IntRange(1), default=None, help="Then keep the K best by --by ...")
@click.option("--per", type=click.Choice(["prompt", "all"]), default="prompt", show_default=True,
              help="... per prompt (best of N), or over the whole file.")
@click.option("--by", default=None, callback=text_option, help="The output that ranks (default: the first, quality).")
@IMAGES_ROOT
@click.option("--layout", type=click.Choice(["manifest", "train"]), default="manifest", show_default=True,
              help="manifest: image, prompt, <scores>, error (what ipiqa score reads; also a scores file for ipiqa "
                   "report). train: image, prompt, score[, score2] for 'ipiqa train ... --dataset csv --labels "
                   "keep.csv --images <keep.csv's folder>'.")
@click.option("--to-shards", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also (or instead of -o) write the kept samples as new WebDataset shards DIR/00000.tar, ...: every "
                   "member of each (image, .txt, .json, ...) plus KEY.scores.json with its scores. Rows must be "
                   "SHARD::KEY (a run over shards); each source shard is read once, streamed.")
@click.option("--shard-size", type=click.IntRange(1), default=10_000, show_default=True,
              help="Samples per shard written by --to-shards.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@friendly
def select_cmd(scores: str, output: Optional[Path], mins: tuple[str, ...], maxs: tuple[str, ...],
               top_k: Optional[int], per: str, by: Optional[str], images_root: Optional[Path], layout: str,
               to_shards: Optional[Path], shard_size: int, quiet: bool) -> None:
    """Keep the rows of a scores file or set that pass thresholds and/or are the best K (per prompt), as a
    manifest and/or as new WebDataset shards.

    SCORES: a scores file, or a set read as one (an --output-dir folder, a pattern, a list file), as for
    'ipiqa report'. Error rows are never kept. Rows are written in the set's order; image paths are rewritten
    to resolve from the manifest's folder. Thresholds stream (constant memory); --top-k holds K rows per
    distinct prompt (--per prompt) or K in all (--per all).

    \b
    Examples:
      ipiqa select scores.csv --top-k 1 --per prompt -o keep.csv          # best of N per prompt
      ipiqa select scores.csv --min quality=0.6 -o keep.csv               # a quality threshold
      ipiqa select scores.jsonl --min quality=0.6 --min alignment=0.5 --top-k 2 -o keep.jsonl
      ipiqa select scores.csv --top-k 100 --per all --by alignment -o top100.csv
      ipiqa score bundle/ --images keep.csv -o rescored.csv               # the manifest scores again
      ipiqa select scores/ --min quality=0.6 --to-shards keep/ --shard-size 5000   # filter a sharded dataset
    """
    from .select import Selection, parse_bound, write_selection

    bounds = tuple(parse_bound(t) for t in mins) + tuple(parse_bound(t, upper=True) for t in maxs)
    if top_k is None and not bounds:
        raise click.UsageError("nothing to select by: give --top-k K and/or --min/--max OUTPUT=VALUE")
    if output is None and to_shards is None:
        raise click.UsageError("nowhere to write: give -o keep.csv and/or --to-shards DIR")
    with _rows_bar(quiet) as progress:
        r = write_selection(scores, output, Selection(bounds, top_k, per, by), images_root, layout, to_shards,
                            shard_size, progress)
    files = f" of {r.files} score files" if r.files > 1 else ""
    click.echo(f"{f'wrote {r.path}' if r.path is not None else 'selected'}: {r.kept:,} of {r.rows:,} rows{files} "
               f"({r.scored:,} scored, {r.within:,} within the thresholds) in {r.seconds:.1f}s", err=True)
    if r.shards is not None:
        again = f"; {r.shards.reread} read again (their rows are apart in the set)" if r.shards.reread else ""
        click.echo(f"wrote {r.shards.shards} shards into {r.shards.folder}: {r.shards.samples:,} samples, "
                   f"{r.shards.members:,} members (KEY.scores.json included), from {r.shards.sources} source shard "
                   f"reads{again}", err=True)
