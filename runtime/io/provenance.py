"""What made a scores file's numbers: one record per run, beside the output, checked when a run resumes it.

A row's score is a function of (bundle, image, prompt, backend, precision, engine batch, machine) (issue 28,
``backends/base.py``); the output itself holds only images, prompts and numbers. ``Provenance`` records the rest
once per run, in ``<output>.run.json`` beside CSV/JSONL/Parquet outputs (and in a Parquet file's own metadata),
so a filtered set can be rebuilt and compared, ``ipiqa report`` can say what scored it, and ``--resume`` refuses
to append rows that another bundle, backend, precision or engine batch would score differently.

The sidecar is a list of runs: the run that wrote row 0, then each resume that ran elsewhere (another machine or
ipiqa version: allowed, since a job may move, but recorded with the row it started at).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

from ipiqa.errors import IPIQAError

__all__ = ["Provenance", "SIDECAR_SUFFIX", "sidecar_path", "read_provenance", "read_runs", "write_provenance",
           "check_resume", "bundle_sha256", "file_sha256", "machine_name", "PARQUET_KEY"]

SIDECAR_SUFFIX = ".run.json"
PARQUET_KEY = "ipiqa.provenance"  # the Parquet file's key-value metadata entry holding the record as JSON
_FORMAT = 1
# What a resume must share with the run that wrote the file: each changes a row's bits on one machine.
SAME_ON_RESUME = ("bundle_sha256", "backend", "precision", "engine_batch")


@dataclass(frozen=True)
class Provenance:
    """What produced a run's scores."""

    bundle_sha256: Optional[str]  # SHA-256 of the bundle's manifest.json (a model file: of the file); None: unknown
    backend: str  # what ran, e.g. onnxruntime-cpu-int8, openvino-cpu, tensorrt-fp16, server HOST:PORT
    precision: str  # fp32 | fp16 | bf16 | int8 | unknown (a server that does not say)
    engine_batch: Optional[int]  # rows per engine call; None: the caller's batch (not reproducible across batches)
    ipiqa_version: str
    machine: str  # the CPU model, or the GPU's name, where the engines ran

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: object) -> "Provenance":
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise IPIQAError(f"{where}: not an ipiqa run record (no {', '.join(missing)}); delete it or restore it")
        return cls(**{n: data[n] for n in names})

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: object) -> "Provenance":
        try:
            data = json.loads(text)
        except ValueError:
            raise IPIQAError(f"{where}: not an ipiqa run record (not JSON)") from None
        return cls.from_dict(data if isinstance(data, dict) else {}, where)

    @classmethod
    def served(cls, url: str, record: Optional[str] = None, bundle_sha256: Optional[str] = None) -> "Provenance":
        """A remote run's record: the server's own (``record``: the ``to_json()`` of the server's
        ``Scorer.provenance``, as ``ipiqa serve`` may publish it), else what any ipiqa server says, its bundle
        hash (backend and precision then ``unknown``, not compared on resume)."""
        if record:
            return cls.from_json(record, url)
        from ipiqa import __version__

        return cls(bundle_sha256, f"server {url}", "unknown", None, __version__, "unknown")

    def differences(self, other: "Provenance", keys: tuple[str, ...] = SAME_ON_RESUME) -> list[tuple[str, Any, Any]]:
        """(key, this value, the other's) for each of ``keys`` that differs."""
        return [(k, getattr(self, k), getattr(other, k)) for k in keys if getattr(self, k) != getattr(other, k)]


def sidecar_path(output: Union[str, Path]) -> Path:
    return Path(str(output) + SIDECAR_SUFFIX)


def file_sha256(path: Union[str, Path]) -> str:
    """A file's SHA-256, read in 1 MiB blocks (a model file may be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_sha256(root: Union[str, Path]) -> str:
    """The bundle's identity: the hash of its manifest, which holds every file's own hash (what ``ipiqa serve``
    publishes too)."""
    return file_sha256(Path(root) / "manifest.json")


def _gpu_name(device_id: int) -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", f"--id={device_id}", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out else None


def machine_name(backend: Any) -> str:
    """Where ``backend``'s engines run, as a record names it: the GPU's name, or the CPU model."""
    from ipiqa.runtime.cpu import cpu_model

    if not getattr(backend, "gpu", False):
        return cpu_model()
    index = getattr(backend, "device_id", None)
    if index is None:
        index = getattr(getattr(backend, "device", None), "index", None) or 0
    return getattr(backend, "gpu_name", None) or _gpu_name(int(index)) or f"GPU {index} (name not readable)"


def _read_sidecar(path: Path) -> Optional[list[dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IPIQAError(f"{path}: cannot read the run record ({exc.strerror})") from None
    try:
        data = json.loads(text)
        runs = data["runs"]
        if not isinstance(runs, list) or not runs:
            raise ValueError("no runs")
    except (ValueError, KeyError, TypeError):
        raise IPIQAError(f"{path}: not an ipiqa run record (cut or edited); delete it to score without the "
                         "check, or restore it") from None
    return runs


def _parquet_record(path: Path) -> Optional[Provenance]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return None
    try:
        metadata = pq.read_schema(path).metadata or {}
    except Exception:  # noqa: BLE001 - not (yet) a readable Parquet file: the sidecar decides
        return None
    raw = metadata.get(PARQUET_KEY.encode())
    return None if raw is None else Provenance.from_dict(json.loads(raw), path)


def read_runs(path: Union[str, Path]) -> list[tuple[int, Provenance]]:
    """(first row, provenance) of every run that wrote the scores file ``path``; [] when none is recorded."""
    runs = _read_sidecar(sidecar_path(path)) or []
    return [(int(r.get("from_row", 0)), Provenance.from_dict(r, sidecar_path(path))) for r in runs]


def _folder_provenance(folder: Path) -> Optional[Provenance]:
    """The one record every per-partition file of an ``--output-dir`` folder shares (None: none recorded)."""
    found: dict[Provenance, Path] = {}
    for side in sorted(folder.glob(f"*{SIDECAR_SUFFIX}")):
        if side.name.startswith("."):
            continue  # a partition still being written
        runs = _read_sidecar(side)
        if runs:
            found.setdefault(Provenance.from_dict(runs[0], side), side)
    if len(found) > 1:
        (a, pa), (b, pb) = list(found.items())[:2]
        diff = "; ".join(f"{k} {x} vs {y}" for k, x, y in a.differences(b, tuple(f.name for f in fields(Provenance))))
        raise IPIQAError(f"{folder}: its score files come from different runs ({pa} vs {pb}: {diff}); report or "
                         "select them separately")
    return next(iter(found), None)


def read_provenance(path: Union[str, Path]) -> Optional[Provenance]:
    """What made the scores in ``path`` (a scores file, or an ``--output-dir`` folder), or None when the output
    predates records (or was written to stdout). A Parquet file carries it in its metadata too."""
    path = Path(path)
    if path.is_dir():
        return _folder_provenance(path)
    runs = read_runs(path)
    if runs:
        return runs[0][1]
    return _parquet_record(path) if path.suffix.lower() == ".parquet" else None


def _write_runs(side: Path, runs: list[dict[str, Any]]) -> None:
    """Whole or not at all: written beside, then renamed over."""
    tmp = side.with_name(f".{side.name}.tmp")
    try:
        tmp.write_text(json.dumps({"ipiqa_run_record": _FORMAT, "runs": runs}, indent=1, sort_keys=True) + "\n",
                       encoding="utf-8")
        os.replace(tmp, side)
    except OSError as exc:
        raise IPIQAError(f"{side}: cannot write the run record ({exc.strerror}); choose another --output") from None


def check_resume(output: Path, provenance: Provenance) -> None:
    """Refuse to resume ``output`` with a run whose rows would get other bits: another bundle, backend,
    precision or engine batch than the run that wrote it (naming both values and both files)."""
    runs = read_runs(output)
    if not runs:
        return
    first = runs[0][1]
    if provenance.bundle_sha256 is None or first.bundle_sha256 is None:  # a server that does not say: not compared
        keys = tuple(k for k in SAME_ON_RESUME if k != "bundle_sha256")
    else:
        keys = SAME_ON_RESUME
    if "unknown" in (provenance.precision, first.precision):  # a server that says only its bundle
        keys = tuple(k for k in keys if k == "bundle_sha256")
    diff = first.differences(provenance, keys)
    if diff:
        was = ", ".join(f"{k} {old}" for k, old, _ in diff)
        now = ", ".join(f"{k} {new}" for k, _, new in diff)
        raise IPIQAError(f"{output}: cannot resume: its rows were scored with {was} (recorded in "
                         f"{sidecar_path(output)}), this run has {now}; resume with the same bundle, --backend and "
                         "--precision, or score into another --output")


def write_provenance(output: Path, provenance: Provenance, rows_before: int) -> None:
    """Record this run beside ``output``: a new output gets its first record; a resumed one (``rows_before``
    rows kept) keeps its records and adds this run's when it ran elsewhere (machine, version) or when none was
    recorded before (an output of an older ipiqa: the record then says from which row it holds)."""
    side = sidecar_path(output)
    record = {"from_row": rows_before, **asdict(provenance)}
    runs = (_read_sidecar(side) or []) if rows_before else []
    if runs and all(Provenance.from_dict(r, side) == provenance for r in runs[-1:]):
        return  # the same run continued: nothing new to say
    _write_runs(side, runs + [record])


def remove_provenance(output: Path) -> None:
    try:
        os.unlink(sidecar_path(output))
    except FileNotFoundError:
        pass
