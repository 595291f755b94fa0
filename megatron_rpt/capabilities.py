"""What this machine can run: CUDA, Transformer Engine, SGLang runtime, DALI.

Every optional GPU dependency is probed here, lazily and once, with ``except Exception``:
Transformer Engine raises ``RuntimeError`` (not ImportError) on machines without CUDA
libraries, and sglang's runtime modules import CUDA kernels. Nothing else in the package
imports those libraries at module level; layer specs, rollout engines and tests ask here.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger(__name__)


@functools.cache
def have_cuda() -> bool:
    """A CUDA device is usable by torch."""
    try:
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.device_count() > 0)
    except Exception:  # noqa: BLE001 - any failure means "no"
        return False


@functools.cache
def have_te() -> bool:
    """Transformer Engine's PyTorch layers import (and a GPU is present for them to run on)."""
    if not have_cuda():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        logger.debug("Transformer Engine unavailable: %s", exc)
        return False
    return True


@functools.cache
def have_sglang_runtime() -> bool:
    """SGLang's Engine can be started: sglang and its GPU kernels import and a GPU is present."""
    if not have_cuda():
        return False
    try:
        import sgl_kernel  # noqa: F401
        import sglang.srt.entrypoints.engine  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        logger.debug("SGLang runtime unavailable: %s", exc)
        return False
    return True


@functools.cache
def have_dali() -> bool:
    """NVIDIA DALI imports."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def summary() -> dict[str, bool]:
    """All capabilities, for logs and the run directory."""
    return {
        "cuda": have_cuda(),
        "transformer_engine": have_te(),
        "sglang_runtime": have_sglang_runtime(),
        "dali": have_dali(),
    }
