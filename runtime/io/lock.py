"""Keeping runs off each other's outputs: one run per output file (``OutputLock``), one per shard output
(``try_flock``, taken by ``partitions``).

Only "would block" means another run holds a lock. Any other error from ``flock`` means this filesystem cannot
lock (NFS mounted ``nolock``, Lustre without ``-o flock``: ENOLCK, ENOSYS, EOPNOTSUPP): reading it as "busy"
made ``--output-dir`` skip every shard and exit 0, so it is one error naming the filesystem and the fix.
"""
from __future__ import annotations

import errno
import importlib.util
import os
import socket
import time
from pathlib import Path
from typing import IO, Optional, Union

from .formats import OutputError

__all__ = ["OutputLock", "try_flock", "write_holder", "LockUnsupported"]

BUSY_ERRNOS = frozenset({errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES})  # flock(LOCK_NB): another holder


class LockUnsupported(OutputError):
    """The filesystem holding an output cannot take advisory locks."""


def _filesystem(path: Path) -> str:
    """``TYPE at MOUNTPOINT`` for the filesystem holding ``path`` (from /proc/mounts; '' where unreadable)."""
    try:
        target = os.path.realpath(path.parent)
        best = ("", "")
        with open("/proc/mounts", encoding="utf-8") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3:
                    mount = parts[1].replace("\\040", " ")
                    inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                    if inside and len(mount) >= len(best[0]):
                        best = (mount, parts[2])
        return f"{best[1]} at {best[0]}" if best[0] else ""
    except OSError:
        return ""


def try_flock(path: Path, fix: str) -> Optional[IO[str]]:
    """``path`` opened and locked exclusively without waiting, or None when another process holds it: the one
    claim both the output lock and the per-shard claims (``partitions``) take. ``fix``: what the user should do
    when the file cannot be created. A filesystem that cannot lock raises ``LockUnsupported``."""
    import fcntl

    try:
        fh = open(path, "a+", encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"{path}: cannot create the lock file ({exc.strerror}); {fix}") from None
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        fh.close()
        if exc.errno in BUSY_ERRNOS:
            return None
        fs = _filesystem(path)
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        raise LockUnsupported(
            f"{path}: cannot lock ({exc.strerror or exc}, {name}): the filesystem holding it"
            f"{f' ({fs})' if fs else ''} does not support flock (NFS mounted nolock, Lustre without -o flock); "
            "write the output to a local disk or a filesystem mounted with locking (NFS: remove nolock; "
            "Lustre: mount -o flock)") from None
    return fh


def write_holder(fh: IO[str]) -> None:
    """Who holds the lock (pid, host, start), for the refusal another run prints."""
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    fh.flush()


class OutputLock:
    """An advisory lock on ``<output>.lock`` for the length of a run: a second run on the same output refuses,
    naming the first (pid, host, start time). POSIX only (``fcntl``); elsewhere it does nothing."""

    def __init__(self, output: Union[str, Path, None]):
        special = output is not None and Path(output).exists() and not Path(output).is_file()  # /dev/null, a pipe
        self.path = None if output is None or str(output) == "-" or special else Path(str(output) + ".lock")
        self._fh: Optional[IO[str]] = None

    def __enter__(self) -> "OutputLock":
        if importlib.util.find_spec("fcntl") is None:  # pragma: no cover - Windows: no advisory locks
            return self
        if self.path is None:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.path.parent}: cannot create the output's folder ({exc.strerror}); choose "
                              "another --output") from None
        while True:
            fh = try_flock(self.path, "choose an --output in a writable folder")
            if fh is None:
                try:
                    holder = self.path.read_text(encoding="utf-8").strip() or "another process"
                except OSError:
                    holder = "another process"
                raise OutputError(f"{str(self.path)[:-5]}: another ipiqa run is writing this output ({holder}); "
                                  f"wait for it to finish, or choose another --output. If no such run exists, delete "
                                  f"{self.path}.")
            try:
                same = os.fstat(fh.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file another run unlinked while we waited for it
                break
            fh.close()
        write_holder(fh)
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
