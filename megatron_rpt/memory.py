"""Move tensor storages out of memory and back, bit-exactly, keeping every view valid.

``StorageOffload`` takes a list of tensors, deduplicates them by storage (a gradient buffer and
the thousands of ``main_grad`` views into it are one storage), copies each storage's bytes
out and shrinks the storage to zero bytes with ``untyped_storage().resize_(0)``; ``reload``
grows it back and copies the bytes in. Views, parameters and optimizer-state entries keep
pointing at the same storage objects, so nobody holding a reference has to be told.

Where the bytes go:

* CUDA storages: pinned host buffers (allocated on the first offload and reused, so an
  offload costs a device-to-host copy, not a host allocation), then
  ``torch.cuda.empty_cache()`` so the freed blocks go back to the driver, where another
  process (the colocated SGLang engine) can map them.
* CPU storages: a file (one per offload, in ``spill_dir`` or the system temp dir), written and
  read sequentially; after the storages shrink, glibc's ``malloc_trim`` returns the freed heap
  pages to the OS, so the process's resident set really drops. Copying into another CPU
  tensor would free nothing.

Shapes: none here; every storage is handled as flat bytes (``[nbytes]`` uint8).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def _bytes_view(storage: torch.UntypedStorage) -> torch.Tensor:
    """``[nbytes]`` uint8 tensor over the whole storage (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def unique_storages(tensors: Iterable[torch.Tensor]) -> list[torch.UntypedStorage]:
    """The distinct, non-empty storages behind ``tensors``, in first-seen order."""
    seen: set[int] = set()
    out = []
    for tensor in tensors:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if storage.nbytes() == 0 or ptr in seen:
            continue
        seen.add(ptr)
        out.append(storage)
    return out


def release_freed_host_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``; no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class StorageOffload:
    """Offload / reload a fixed set of storages (module docstring). Not thread-safe."""

    def __init__(self, spill_dir: str | Path | None = None) -> None:
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._held: list[tuple[torch.UntypedStorage, int]] = []
        self._pinned: dict[int, torch.Tensor] = {}
        """CUDA: pinned host buffer per storage (by position in the offloaded list)."""
        self._file: Path | None = None

    @property
    def offloaded(self) -> bool:
        """Storages are out of memory now."""
        return bool(self._held)

    @property
    def count(self) -> int:
        """Storages currently offloaded."""
        return len(self._held)

    @property
    def nbytes(self) -> int:
        """Bytes currently offloaded."""
        return sum(n for _, n in self._held)

    def offload(self, tensors: Iterable[torch.Tensor]) -> int:
        """Move the storages of ``tensors`` out; returns the bytes freed."""
        if self._held:
            raise RuntimeError("offload() called twice without reload()")
        storages = unique_storages(tensors)
        cuda = [s for s in storages if s.device.type == "cuda"]
        host = [s for s in storages if s.device.type != "cuda"]
        if cuda:
            self._to_pinned(cuda)
        if host:
            self._to_file(host)
        self._held = [(s, s.nbytes()) for s in cuda + host]
        for storage, _ in self._held:
            storage.resize_(0)
        if cuda:
            torch.cuda.empty_cache()
        if host:
            release_freed_host_memory()
        return self.nbytes

    def reload(self) -> None:
        """Grow every offloaded storage back and restore its bytes exactly."""
        if not self._held:
            return
        for storage, nbytes in self._held:
            storage.resize_(nbytes)
        cuda = [(i, s) for i, (s, _) in enumerate(self._held) if s.device.type == "cuda"]
        for i, storage in cuda:
            _bytes_view(storage).copy_(self._pinned[i], non_blocking=True)
        if cuda:
            torch.cuda.synchronize()
        host = [s for s, _ in self._held if s.device.type != "cuda"]
        if host:
            self._from_file(host)
        self._held = []

    def _to_pinned(self, storages: list[torch.UntypedStorage]) -> None:
        for i, storage in enumerate(storages):
            buf = self._pinned.get(i)
            if buf is None or buf.numel() != storage.nbytes():
                buf = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=True)
                self._pinned[i] = buf
            buf.copy_(_bytes_view(storage), non_blocking=True)
        torch.cuda.synchronize()

    def _to_file(self, storages: list[torch.UntypedStorage]) -> None:
        fd, name = tempfile.mkstemp(prefix="offload-", suffix=".bin", dir=self.spill_dir)
        self._file = Path(name)
        bounce, window = _bounce_buffer()
        with os.fdopen(fd, "wb") as fh:
            for storage in storages:
                view = _bytes_view(storage)
                for start in range(0, view.numel(), _BOUNCE_BYTES):
                    n = min(_BOUNCE_BYTES, view.numel() - start)
                    bounce[:n].copy_(view[start : start + n])
                    fh.write(window[:n])
        logger.debug("offloaded %d host storages to %s", len(storages), name)

    def _from_file(self, storages: list[torch.UntypedStorage]) -> None:
        assert self._file is not None
        bounce, window = _bounce_buffer()
        try:
            with self._file.open("rb") as fh:
                for storage in storages:
                    view = _bytes_view(storage)
                    for start in range(0, view.numel(), _BOUNCE_BYTES):
                        n = min(_BOUNCE_BYTES, view.numel() - start)
                        if fh.readinto(window[:n]) != n:
                            raise OSError(f"{self._file}: offload file is truncated")
                        view[start : start + n].copy_(bounce[:n])
        finally:
            self._file.unlink(missing_ok=True)
            self._file = None


_BOUNCE_BYTES = 16 * 2**20


def _bounce_buffer() -> tuple[torch.Tensor, memoryview]:
    """A host buffer and a writable memoryview of it, for file I/O. The offloaded storages
    themselves are never handed to numpy: that would mark them non-resizable for good."""
    bounce = torch.empty(_BOUNCE_BYTES, dtype=torch.uint8)
    return bounce, memoryview(bounce.numpy())
