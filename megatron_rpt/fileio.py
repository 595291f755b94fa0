"""Crash-safe file output: a failed or interrupted write never leaves output that looks complete.

Two patterns are used across the package:

* ``atomic_write_text`` / ``atomic_write_bytes`` for single files (write a temporary sibling,
  fsync, then ``os.replace``).
* ``atomic_output_dir`` for directories: everything is written into a hidden sibling
  ``.<name>.tmp-<pid>`` and renamed into place only when the ``with`` block succeeds. Readers
  therefore either see the complete previous directory or the complete new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megatron_rpt.errors import InputError


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def check_output_dir(path: str | Path, *, overwrite: bool) -> Path:
    """Fail early (before heavy work) if ``path`` exists and ``overwrite`` is false."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path}: output already exists (pass --overwrite to replace it)")
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: exists and is not a directory")
    return path


def check_not_inside(out: str | Path, source: str | Path, what: str) -> None:
    """Refuse an output directory that is, or contains, its input (``--overwrite`` would
    delete the input)."""
    out_r, src_r = Path(out).resolve(), Path(source).resolve()
    if out_r == src_r or out_r in src_r.parents:
        raise InputError(
            f"{out}: the output directory contains the input {what} {source}; writing there "
            "would delete it (choose another output directory)"
        )


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only if the block succeeds.

    On any exception (or KeyboardInterrupt) the temporary directory is removed and ``path`` is
    left as it was. With ``overwrite`` an existing ``path`` is replaced after the new content is
    complete: it is renamed aside, the new directory renamed in, then the old one deleted.
    """
    path = Path(path)
    check_output_dir(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
