"""One writer per directory: an exclusive OS file lock on a run or prepared-data directory.

``directory_lock(lock_file, what)`` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``lock_file``
and writes the holder's PID and host into it. The kernel releases the lock when the process
exits, however it exits (SIGKILL included), so a crashed run never blocks the next one. A
second process that finds the lock taken fails at once with one line naming the directory
and the holder. (flock is advisory and local: on network file systems that do not support it
across hosts, two hosts are not kept apart.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from megatron_rpt.errors import InputError

RUN_LOCK = ".lock"


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"PID {info['pid']} on host {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (holder unknown)"


@contextlib.contextmanager
def directory_lock(lock_file: str | Path, what: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``lock_file`` for the block; ``what`` names the directory.

    Raises InputError (one line: the directory and the holder's PID and host) when another
    process holds it.
    """
    lock_file = Path(lock_file)
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise InputError(f"{what}: cannot create the lock file {lock_file}: {exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"{what} is in use by {_holder(fd)} (lock {lock_file}); wait for that run to "
                "finish or use another directory"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
        yield lock_file
    finally:
        os.close(fd)  # releases the lock


def run_dir_lock(run_dir: str | Path) -> contextlib.AbstractContextManager[Path]:
    """The lock of a training run directory (``<run_dir>/.lock``)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"run.run_dir={run_dir}: exists and is not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"run.run_dir={run_dir}: cannot create it ({exc})") from None
    return directory_lock(run_dir / RUN_LOCK, f"run.run_dir={run_dir}")


def output_lock(out_dir: str | Path) -> contextlib.AbstractContextManager[Path]:
    """The lock of an output directory made by a tool (a hidden sibling ``.<name>.lock``)."""
    out_dir = Path(out_dir)
    return directory_lock(out_dir.parent / f".{out_dir.name}.lock", str(out_dir))


__all__ = ["directory_lock", "output_lock", "run_dir_lock"]
