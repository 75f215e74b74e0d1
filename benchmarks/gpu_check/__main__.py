"""``python -m benchmarks.gpu_check [--dry-run]``: every part, each on its own, then the report and one summary
line per part. Exit status 0 when no part failed or raised, 1 otherwise."""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

from .layout import ROOT, ensure_layout
from .parts import ERROR, FAIL, PartResult, progress, run_parts

PARTS = ("parity", "decode", "throughput", "reproducible", "claims", "parity-compile")  # compile builds last: the longest, least sure


def _args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__)
    p.add_argument("--dry-run", action="store_true",
                   help="the same parts on the CPU with the reduced-width model (CI; under a minute)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="leave out the --compile variants")
    p.add_argument("--deadline-s", type=float, default=420.0,
                   help="parts not started this many seconds into the check are NOT RUN (the report is written after "
                        "every part, so a run cut short keeps what it measured)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                   help="the report goes to OUT/<machine>/gpu_check.{md,json}")
    p.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".work" / "gpu_check",
                   help="generated models, bundles and images")
    args = p.parse_args(argv)
    unknown = set(filter(None, args.parts.split(","))) - set(PARTS)
    if unknown:
        p.error(f"unknown --parts {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    return args


def _parts(names: Sequence[str], ctx) -> dict[str, Callable[[], PartResult]]:
    from . import claims, decode, parity, reproducible, throughput

    calls = {"parity": lambda: parity.part(ctx), "decode": lambda: decode.part(ctx),
             "throughput": lambda: throughput.part(ctx), "reproducible": lambda: reproducible.part(ctx),
             "claims": lambda: claims.part(ctx),
             "parity-compile": lambda: parity.part(ctx, compiled=True)}
    return {name: calls[name] for name in PARTS if name in names}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _args(argv)
    start = time.perf_counter()
    mapped = ensure_layout()
    import torch

    from ..machine import machine_info, machine_slug
    from .context import Context, settings_for
    from .report import write

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible to torch: run it on a GPU machine, or with --dry-run on a CPU",
              file=sys.stderr)
        return 1
    settings = settings_for(args.dry_run, args.workdir, compile=args.compile)
    from ipiqa.runtime.cpu import usable_cores

    torch.set_num_threads(usable_cores())
    info = machine_info()
    name = machine_slug(info) + ("-dry-run" if args.dry_run else "")
    progress(f"gpu_check on {info['gpu'].get('name', 'no GPU')} ({info['cpu']} x{info['cores']}), torch "
             f"{torch.__version__}; {'dry run' if args.dry_run else 'RN50 at 512 px'}"
             + (f"; mapped {', '.join(mapped)} from the working tree" if mapped else ""))
    header = {"machine_name": name, "machine": info, "dry_run": args.dry_run, "settings": settings.__dict__,
              "command": " ".join(["python -m benchmarks.gpu_check", *(sys.argv[1:] if argv is None else argv)]),
              "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    written: list[Path] = []

    def report(done: list[PartResult]) -> None:
        written[:] = write(args.out, {**header, "seconds": time.perf_counter() - start}, done)

    results = run_parts(_parts(args.parts.split(","), Context(settings)), args.deadline_s, report)
    print("\n".join(["", "summary:", *(r.summary() for r in results), *(str(p) for p in written)]), flush=True)
    return 1 if any(r.status in (FAIL, ERROR) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
