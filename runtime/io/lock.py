"""Keeping runs off each other's outputs: one run per output file, and never an output over its own input."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import IO, Optional, Union

from .formats import OutputError


def refuse_same_file(source: object, output: object) -> None:
    """Writing the output over the manifest being read would destroy it before any row is read."""
    if not isinstance(source, (str, Path)) or output is None or str(output) == "-":
        return
    src, out = Path(source), Path(str(output))
    if src.is_file() and out.exists() and os.path.samefile(src, out):
        raise OutputError(f"{out}: the output is the input manifest; choose another --output")


class OutputLock:
    """An advisory lock on ``<output>.lock`` for the length of a run: a second run on the same output refuses,
    naming the first (pid, host, start time). POSIX only (``fcntl``); elsewhere it does nothing."""

    def __init__(self, output: Union[str, Path, None]):
        special = output is not None and Path(output).exists() and not Path(output).is_file()  # /dev/null, a pipe
        self.path = None if output is None or str(output) == "-" or special else Path(str(output) + ".lock")
        self._fh: Optional[IO[str]] = None

    def __enter__(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        if self.path is None:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.path.parent}: cannot create the output's folder ({exc.strerror}); choose "
                              "another --output") from None
        while True:
            try:
                fh = open(self.path, "a+", encoding="utf-8")
            except OSError as exc:
                raise OutputError(f"{self.path}: cannot create the output's lock file ({exc.strerror}); choose "
                                  "an --output in a writable folder") from None
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                fh.close()
                raise OutputError(f"{str(self.path)[:-5]}: another ipiqa run is writing this output ({holder}); "
                                  f"wait for it to finish, or choose another --output. If no such run exists, delete "
                                  f"{self.path}.") from None
            try:
                same = os.fstat(fh.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file another run unlinked while we waited for it
                break
            fh.close()
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            try:
                os.unlink(self.path)  # type: ignore[arg-type]
            except OSError:
                pass
            self._fh.close()  # releases the lock
            self._fh = None
