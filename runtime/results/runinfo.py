"""The report summary's "run" lines: what made the scores, from the run records ``ipiqa score`` writes beside
its outputs (``io.provenance``: ``<output>.run.json``, a Parquet file's metadata), and from ``--bundle``.

A scores set may hold files of several runs (a shard scored on another machine, a resume elsewhere): each
distinct record is shown with the number of files it covers, and a set whose files come from different
bundles, backends, precisions or engine batches says so (those change a row's bits: issue 28). Files without a
record (written before records existed, or to stdout) are counted as "not recorded".
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from ipiqa.errors import ConfigError

from ..io.provenance import SAME_ON_RESUME, Provenance, bundle_sha256, read_runs, read_provenance
from .sets import ScoresSet

__all__ = ["recorded_runs", "run_lines", "bundle_run_info"]


def recorded_runs(source: ScoresSet) -> tuple[dict[Provenance, int], int]:
    """Each distinct run record of the set's files (every run of a resumed file) -> files it covers; and how many
    files have none."""
    runs: dict[Provenance, int] = {}
    missing = 0
    for f in source.files:
        found = [p for _, p in read_runs(f.path)] or [p for p in (read_provenance(f.path),) if p is not None]
        missing += not found
        for p in dict.fromkeys(found):
            runs[p] = runs.get(p, 0) + 1
    return runs, missing


def _describe(p: Provenance) -> list[tuple[str, str]]:
    return [("backend", p.backend), ("precision", p.precision),
            ("engine batch", str(p.engine_batch) if p.engine_batch is not None else "the caller's batch (not fixed)"),
            ("bundle sha256", p.bundle_sha256 or "unknown"), ("scored by", f"ipiqa {p.ipiqa_version} on {p.machine}")]


def run_lines(source: ScoresSet, bundle: Optional[Union[str, Path]] = None) -> list[tuple[str, str]]:
    """(label, value) pairs for the summary: the recorded runs, then ``--bundle``'s description (refused when the
    records name another bundle). Empty when nothing is known (the page says "not recorded")."""
    runs, missing = recorded_runs(source)
    lines: list[tuple[str, str]] = []
    if len(runs) == 1:
        lines += _describe(next(iter(runs)))
    for n, (p, files) in enumerate(runs.items() if len(runs) > 1 else ()):
        lines += [(f"run {n + 1} ({files} file{'s' if files != 1 else ''})", ", ".join(
            f"{k} {v}" for k, v in _describe(p)))]
    if len(runs) > 1:
        differ = sorted({k for a in runs for b in runs for k, _, _ in a.differences(b, SAME_ON_RESUME)})
        if differ:
            lines.append(("note", f"the files were scored with different {', '.join(differ)}: their scores may "
                                  "differ in the last bits, or more for another bundle"))
    if runs and missing:
        lines.append(("not recorded", f"{missing} of {len(source.files)} files have no run record"))
    if bundle is not None:
        lines += bundle_run_info(bundle, source.outputs, {p.bundle_sha256 for p in runs} - {None})
    elif not runs:
        return []
    return lines


def bundle_run_info(bundle: Union[str, Path], outputs: tuple[str, ...], recorded: set = frozenset()) -> list[tuple[str, str]]:
    """The lines from a bundle's manifest. Refuses a bundle whose outputs are not the file's, or whose hash is not
    the one the run records name: it did not write these scores."""
    from ipiqa.bundle import read_bundle  # torch-free

    m = read_bundle(bundle, verify_hashes=False)  # only its description is read: no hashing of the graphs
    if tuple(m.outputs) != tuple(outputs):
        raise ConfigError(f"--bundle {bundle}: its outputs {list(m.outputs)} are not the scores file's {list(outputs)}; "
                          "give the bundle that wrote these scores")
    if recorded and bundle_sha256(m.root) not in recorded:
        raise ConfigError(f"--bundle {bundle}: its manifest's SHA-256 is not the one the scores' run records name "
                          f"({', '.join(sorted(h[:12] for h in recorded))}...); give the bundle that wrote these scores")
    cfg = m.config
    lines = [("bundle", str(m.root)), ("bundle precision", m.precision),
             ("bundle engines", f"TensorRT {m.engines.tensorrt} ({m.engines.precision})" if m.engines else "ONNX only"),
             ("model", f"{cfg.resolution}px, head {cfg.head}, text branch {'on' if cfg.text else 'off'}"),
             ("built by", f"ipiqa {m.versions.get('ipiqa', '?')}")]
    if not recorded:
        lines.append(("backend", "not recorded in the scores file (ipiqa score prints it when it finishes)"))
    return lines
