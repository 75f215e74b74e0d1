"""Each part of the check on its own: a part that raises is reported with its error and the next one runs.

A part returns a :class:`PartResult`: a status, the bound it was judged by and the figure it measured (the
one summary line), plus its checks as rows for the report. Progress goes to stdout as it happens: the
device machine's output is read only when the call returns, and a run cut short still shows how far it got.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Optional, Sequence

__all__ = ["PASS", "FAIL", "ERROR", "MEASURED", "NOT_RUN", "STATUSES", "PartResult", "status_of", "progress",
           "run_part", "run_parts"]

PASS, FAIL, ERROR, MEASURED, NOT_RUN = "PASS", "FAIL", "ERROR", "MEASURED", "NOT RUN"
STATUSES = (PASS, FAIL, ERROR, MEASURED, NOT_RUN)

_START = time.perf_counter()


def progress(message: str) -> None:
    """One progress line, with the seconds since the check started, flushed at once."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", flush=True)


@dataclass(frozen=True)
class PartResult:
    """One part's outcome. ``bound``: what it is judged by (the gates' bounds, or "none: a measurement");
    ``figure``: what it measured, in one phrase; ``rows``: its checks or measurements, one dict each."""

    name: str
    status: str
    bound: str
    figure: str
    rows: tuple[Mapping[str, Any], ...] = ()
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    error: Optional[str] = None  # the traceback of a part that raised
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"part status must be one of {', '.join(STATUSES)}, got {self.status!r}")

    def summary(self) -> str:
        """The part's one summary line: status, name, bound and figure."""
        return f"{self.status:<8} {self.name}: {self.figure} | bound: {self.bound} ({self.seconds:.1f}s)"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "bound": self.bound, "figure": self.figure,
                "rows": [dict(r) for r in self.rows], "notes": list(self.notes), "seconds": self.seconds,
                "error": self.error, "extra": dict(self.extra), "summary": self.summary()}


def status_of(passed: Sequence[bool]) -> str:
    """PASS when every judged check passed (and there was one), else FAIL."""
    return PASS if passed and all(passed) else FAIL


def run_part(name: str, fn: Callable[[], PartResult]) -> PartResult:
    """``fn()`` timed; an exception becomes an ERROR result naming it (the traceback kept for the report)."""
    progress(f"part {name}: start")
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - one part's failure is that part's result, never the run's
        result = PartResult(name, ERROR, "n/a (the part raised)", f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                            error=traceback.format_exc())
    result = replace(result, name=name, seconds=time.perf_counter() - start)
    progress(f"part {name}: {result.summary()}")
    return result


def run_parts(parts: Mapping[str, Callable[[], PartResult]], deadline_s: Optional[float] = None,
              on_result: Callable[[list[PartResult]], None] = lambda done: None) -> list[PartResult]:
    """Every part in order, each on its own; ``on_result`` sees the results so far after each part (the report is
    rewritten, so a run killed by its time limit keeps what it measured). A part not started by ``deadline_s``
    (seconds since the check started) is NOT RUN, so the check ends inside the lease's call."""
    done: list[PartResult] = []
    for name, fn in parts.items():
        elapsed = time.perf_counter() - _START
        if deadline_s is not None and elapsed > deadline_s:
            done.append(PartResult(name, NOT_RUN, "n/a", f"not started: {elapsed:.0f}s had passed, past the "
                                   f"check's deadline of {deadline_s:.0f}s"))
            progress(f"part {name}: {done[-1].summary()}")
        else:
            done.append(run_part(name, fn))
        on_result(done)
    return done
