"""One writer per directory: a second run or data preparation fails at once, naming the holder."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_rpt.data.config import DataConfig
from megatron_rpt.data.pipeline import prepare_data
from megatron_rpt.dir_lock import directory_lock, output_lock, run_dir_lock
from megatron_rpt.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
HOLD = (
    "import sys, time; from megatron_rpt.dir_lock import directory_lock\n"
    "with directory_lock(sys.argv[1], 'x'):\n"
    "    print('held', flush=True); time.sleep(60)\n"
)


def _holder(lock_file: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock_file)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_fails_at_once_naming_pid_and_host(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = _holder(run_dir / ".lock")
    try:
        start = time.monotonic()
        with pytest.raises(InputError) as err, run_dir_lock(run_dir):
            pass
        assert time.monotonic() - start < 5
        msg = str(err.value)
        assert (
            f"run.run_dir={run_dir} is in use by PID {proc.pid} on host {socket.gethostname()}"
            in msg
        )
        assert "\n" not in msg
    finally:
        proc.kill()
        proc.wait()
    with run_dir_lock(run_dir):  # released when the holder dies (SIGKILL)
        pass


def test_lock_is_reentrant_only_after_release(tmp_path):
    with directory_lock(tmp_path / "l", "d"):
        pass
    with directory_lock(tmp_path / "l", "d"):
        pass


def test_run_dir_under_a_regular_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="run.run_dir=.*cannot create it"):
        run_dir_lock(tmp_path / "file" / "run")


def test_second_data_preparation_fails_at_once(tmp_path):
    out = tmp_path / "data"
    proc = _holder(tmp_path / ".data.lock")
    try:
        with pytest.raises(InputError, match=rf"{out} is in use by PID {proc.pid}"):
            prepare_data(DataConfig(), out)
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists() and not (tmp_path / ".data.work").exists()
    with output_lock(out):
        pass
