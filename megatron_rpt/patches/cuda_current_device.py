"""Patch 'device': ``torch.cuda.current_device()`` returns ``torch.device("cpu")``.

What it changes: the global ``torch.cuda.current_device`` function, on machines without a
usable CUDA device only (where the original raises "Torch not compiled with CUDA enabled").

Why it is safe: Megatron-Core calls it to choose the device of a *new* buffer, and on a
CPU-only machine the CPU is the only correct answer. Call sites on megatron_rpt's paths in
0.16.1: ``RotaryEmbedding.get_emb`` (moves ``inv_freq`` "to the GPU" at the first forward),
the PP p2p receive/shape buffers (``p2p_communication``) and the async-save helpers of
dist_checkpointing. Nothing is routed to a different device than the one in use; code that
checks ``torch.cuda.is_available()`` first is unaffected.

When to remove: when ``upstream_fails()`` returns False, i.e. RoPE (the first call site any
forward hits) no longer asks for the current CUDA device on CPU; then re-check the others by
running tests/distributed with ``MEGATRON_RPT_CPU_PATCHES=sync,mode``.
"""

from __future__ import annotations

import torch

GLOBAL = True
_original = torch.cuda.current_device


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def apply() -> None:
    """Install the patch."""
    torch.cuda.current_device = _cpu_current_device


def revert() -> None:
    """Restore torch's own function."""
    torch.cuda.current_device = _original


def is_applied() -> bool:
    """The patch is installed."""
    return torch.cuda.current_device is _cpu_current_device


def upstream_fails() -> bool:
    """Run the unpatched upstream call site; True when it fails the CPU-only way."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_rpt.patches import is_cuda_failure

    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True)
    try:
        rope.get_emb(4)
    except Exception as exc:  # noqa: BLE001 - classified below
        if is_cuda_failure(exc):
            return True
        raise
    return False
