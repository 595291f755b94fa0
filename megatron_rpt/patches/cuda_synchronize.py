"""Patch 'sync': ``torch.cuda.synchronize()`` is a no-op.

What it changes: the global ``torch.cuda.synchronize`` function, on machines without a usable
CUDA device only (where the original raises).

Why it is safe: with no CUDA device there are no CUDA streams and no pending device work;
synchronising with nothing is exactly a no-op. Call site on megatron_rpt's path in 0.16.1:
``FileSystemWriterAsync.preload_tensors(..., non_blocking=True)``, which every ``torch_dist``
``dist_checkpointing.save`` runs after its (here: CPU-to-CPU) "device-to-host" copies.

When to remove: when ``upstream_fails()`` returns False (the save path stops synchronising
unconditionally).
"""

from __future__ import annotations

import torch

GLOBAL = True
_original = torch.cuda.synchronize


def _no_sync(device: object = None) -> None:
    return None


def apply() -> None:
    """Install the patch."""
    torch.cuda.synchronize = _no_sync


def revert() -> None:
    """Restore torch's own function."""
    torch.cuda.synchronize = _original


def is_applied() -> bool:
    """The patch is installed."""
    return torch.cuda.synchronize is _no_sync


def upstream_fails() -> bool:
    """Run the unpatched upstream call site; True when it fails the CPU-only way."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync,
    )

    from megatron_rpt.patches import is_cuda_failure

    try:
        FileSystemWriterAsync.preload_tensors([], non_blocking=True)
    except Exception as exc:  # noqa: BLE001 - classified below
        if is_cuda_failure(exc):
            return True
        raise
    return False
