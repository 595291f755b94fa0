"""Patch 'rng': Megatron's CUDA RNG state get/set are no-ops without a CUDA device.

What it changes: ``megatron.core.tensor_parallel.random._get_cuda_rng_state`` returns an empty
uint8 tensor and ``_set_cuda_rng_state`` does nothing, on machines without a usable CUDA device
only (where the originals raise "Torch not compiled with CUDA enabled"). Only the module
attributes are replaced; torch's own ``torch.cuda`` RNG functions are left alone.

Why it is safe: activation recompute (``recompute_granularity`` full or selective) runs
layers through ``tensor_parallel.checkpoint`` (``CheckpointFunction``), which saves three RNG
states before the forward and restores them before recomputing it in backward: the CPU
generator (``torch.get_rng_state``, kept as is), the CUDA generator (these two functions) and
the model-parallel tracker's states. With no CUDA device there is no CUDA generator: nothing
can draw from it, so there is nothing to save or restore, and the recomputed forward sees the
same CPU generator state as the original one (dropout included). The tracker's own states are
untouched (on CPU it is the inference tracker, megatron_rpt.distributed).

When to remove: when ``upstream_fails()`` returns False, i.e. ``_get_all_rng_states()`` (the
first call of every checkpointed forward) no longer asks CUDA for its RNG state on CPU.
"""

from __future__ import annotations

from typing import Any

import torch

GLOBAL = True
_ORIGINALS: dict[str, Any] = {}


def _module() -> Any:
    from megatron.core.tensor_parallel import random

    return random


def _no_cuda_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


def _set_nothing(*args: Any, **kwargs: Any) -> None:
    return None


def apply() -> None:
    """Install the patch."""
    random = _module()
    if not _ORIGINALS:
        _ORIGINALS["get"] = random._get_cuda_rng_state
        _ORIGINALS["set"] = random._set_cuda_rng_state
    random._get_cuda_rng_state = _no_cuda_state
    random._set_cuda_rng_state = _set_nothing


def revert() -> None:
    """Restore Megatron's own functions."""
    if _ORIGINALS:
        random = _module()
        random._get_cuda_rng_state = _ORIGINALS["get"]
        random._set_cuda_rng_state = _ORIGINALS["set"]


def is_applied() -> bool:
    """The patch is installed."""
    return _module()._get_cuda_rng_state is _no_cuda_state


def upstream_fails() -> bool:
    """Run the unpatched upstream call site; True when it fails the CPU-only way."""
    from megatron_rpt.patches import is_cuda_failure

    random = _module()
    # _get_all_rng_states() creates Megatron's global RNG tracker when there is none; put the
    # previous state back so that a later seed_model_parallel() installs its own tracker.
    saved = random._CUDA_RNG_STATE_TRACKER, random._CUDA_RNG_STATE_TRACKER_INITIALIZED
    try:
        random._get_all_rng_states()
    except Exception as exc:  # noqa: BLE001 - classified below
        if is_cuda_failure(exc):
            return True
        raise
    finally:
        random._CUDA_RNG_STATE_TRACKER, random._CUDA_RNG_STATE_TRACKER_INITIALIZED = saved
    return False
