"""A model path that is a FIFO or a device is refused by name before anything opens it (a FIFO would block).

Each call runs in a child process with a timeout: a blocked open inside safetensors holds the GIL, so a
regression would hang a thread of this process rather than fail.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")

CALL = """
import sys
from ipiqa import checkpoint
from ipiqa.errors import IPIQAError
try:
    getattr(checkpoint, sys.argv[1])(sys.argv[2])
except IPIQAError as exc:
    print(exc)
    raise SystemExit(3)
"""


def _refusal(fn: str, path) -> str:
    """The IPIQAError text ``ipiqa.checkpoint.<fn>(path)`` raises; fails if it blocks or accepts the path."""
    try:
        done = subprocess.run([sys.executable, "-c", CALL, fn, str(path)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{fn} blocked on {path}")
    assert done.returncode == 3, done.stdout + done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("fn", ["read_config", "load_model"])
def test_a_fifo_model_path_is_an_error_naming_it(fn, tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    assert _refusal(fn, fifo).startswith(f"{fifo}: is a named pipe (FIFO), not a regular file")


def test_a_device_model_path_is_an_error_naming_it():
    assert _refusal("read_config", "/dev/zero").startswith("/dev/zero: is a character device, not a regular file")
