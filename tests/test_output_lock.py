"""The output lock (runtime/io/lock.py): only "would block" means another run holds an output; a filesystem that
cannot lock (NFS mounted nolock, Lustre without -o flock) is one error naming it and the fix, and the run exits
non-zero instead of skipping every shard as "busy" (issue 27.7). Checked through a patched ``fcntl.flock``."""
from __future__ import annotations

import errno
import fcntl
import os

import pytest
from click.testing import CliRunner

from ipiqa.errors import IPIQAError
from ipiqa.runtime.io import formats, lock
from ipiqa.runtime.io.lock import LockUnsupported, OutputLock, try_flock


def _flock_raising(monkeypatch, err: int) -> None:
    """``flock`` that fails with ``err`` for every exclusive claim (unlocking still works)."""
    real = fcntl.flock

    def flock(fd, operation):
        if operation & fcntl.LOCK_EX:
            raise OSError(err, os.strerror(err))
        return real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)


@pytest.mark.parametrize("err", [errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP], ids=["ENOLCK", "ENOSYS", "EOPNOTSUPP"])
def test_a_filesystem_that_cannot_lock_is_one_error_naming_it_and_the_fix(tmp_path, monkeypatch, err):
    _flock_raising(monkeypatch, err)
    with pytest.raises(LockUnsupported) as refused:
        with OutputLock(tmp_path / "s.csv"):
            pass
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 's.csv.lock'}: cannot lock (") and errno.errorcode[err] in message
    assert "does not support flock" in message and "mounted with locking" in message and "\n" not in message


@pytest.mark.parametrize("err", [errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES], ids=["EWOULDBLOCK", "EAGAIN", "EACCES"])
def test_only_would_block_means_another_run_holds_the_output(tmp_path, monkeypatch, err):
    _flock_raising(monkeypatch, err)
    assert try_flock(tmp_path / "x.lock", "fix") is None
    with pytest.raises(IPIQAError, match="another ipiqa run is writing this output"):
        with OutputLock(tmp_path / "s.csv"):
            pass


def test_output_dir_on_a_filesystem_without_locks_exits_non_zero_scoring_nothing(tiny_bundle, tmp_path, monkeypatch):
    from test_shards import good_samples, write_shard

    from ipiqa.cli import cli

    for s in range(2):
        write_shard(tmp_path / f"{s:05d}.tar", good_samples(4 * s, 2))
    _flock_raising(monkeypatch, errno.ENOLCK)
    result = CliRunner().invoke(cli, ["score", str(tiny_bundle), "--images", str(tmp_path / "{00000..00001}.tar"),
                                      "--output-dir", str(tmp_path / "scores"), "--backend", "onnxruntime",
                                      "--device", "cpu", "-q"])
    assert result.exit_code == 1 and "does not support flock" in result.output and "Traceback" not in result.output
    assert not list((tmp_path / "scores").glob("*.csv"))

