"""``gpu_check.json`` (everything) and ``gpu_check.md`` (the summary lines, then each part's rows) in
``<out>/<machine>/``: the machine's name from ``benchmarks.machine`` (the GPU's, or ``cpu-Ncore``)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from .parts import PartResult

__all__ = ["write", "markdown"]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    if value is None:
        return ""
    return str(value).replace("|", "/").replace("\n", " ")


def _table(rows: Sequence[dict]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys and k != "traceback"]  # tracebacks: in the JSON only
    return [f"| {' | '.join(keys)} |", f"| {' | '.join('---' for _ in keys)} |",
            *(f"| {' | '.join(_cell(r.get(k)) for k in keys)} |" for r in rows)]


def markdown(header: dict, results: Sequence[PartResult]) -> str:
    lines = [f"# GPU check: {header['machine_name']}", "",
             f"`{header['command']}`, {header['timestamp']}, {header['seconds']:.0f} s in all"
             + (" (dry run: CPU, reduced-width model)" if header["dry_run"] else ""), "",
             f"Machine: {header['machine']['cpu']} x{header['machine']['cores']}, GPU "
             f"{header['machine']['gpu'] or 'none'}; versions {header['machine']['versions']}", "", "## Summary", "",
             "```", *(r.summary() for r in results), "```"]
    for r in results:
        lines += ["", f"## {r.name}: {r.status}", "", f"- bound: {r.bound}", f"- figure: {r.figure}",
                  *(f"- {n}" for n in r.notes), ""]
        if r.rows:
            lines += _table(r.rows)
        if r.error:
            lines += ["", "```", r.error.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write(out: Path, header: dict, results: Sequence[PartResult]) -> list[Path]:
    folder = out / header["machine_name"]
    folder.mkdir(parents=True, exist_ok=True)
    data = {**header, "parts": [r.to_dict() for r in results]}
    paths = [folder / "gpu_check.json", folder / "gpu_check.md"]
    paths[0].write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(header, results), encoding="utf-8")
    return paths
