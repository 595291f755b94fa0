"""The monkeypatches Megatron-Core 0.16.1 still needs: CPU-only ones, and 'optckpt' wherever
Megatron falls back to torch's Adam.

Megatron-Core hard-codes a few CUDA calls on paths megatron_rpt runs in CPU development and
CI. Where a clean workaround exists it is used instead of a patch (docs/CPU.md C1-C5:
``use_cpu_initialization``, the inference RNG tracker, the SDPA core attention swapped in
through the layer spec, ``batch_p2p_sync=False``, ``Float16Module`` for bf16). What remains:

=========  ======================================  ==============================================
name       what                                    needed by
=========  ======================================  ==============================================
device     ``torch.cuda.current_device()`` -> cpu  RoPE ``get_emb``, PP p2p receive buffers,
           (global, applied once)                  dist_checkpointing async-save helpers
sync       ``torch.cuda.synchronize()`` -> no-op   dist_checkpointing ``torch_dist`` save
           (global, applied once)                  (``FileSystemWriterAsync.preload_tensors``)
mode       ``device="cuda"`` -> cpu inside a       pipeline schedules' ``total_num_tokens``
           ``cuda_device_mode()`` /                (``torch.zeros(..., device="cuda")``), the
           ``optimizer_mode()`` block only         optimizer's flags/scalers, grad-norm buffers
typestr    CPU ``Tensor.type()`` reports the       the optimizer's ``param.type()`` dtype checks
           CUDA name, in ``optimizer_mode()``      (DistributedOptimizer, Float16 optimizer)
           only
optckpt    DistributedOptimizer checkpoint fixes   torch-Adam ``step`` state on checkpoint load
           (global; whenever Megatron falls back   (three upstream bugs, see the module)
           to torch Adam, i.e. without TE/Apex)
rng        Megatron's ``_get/_set_cuda_rng_state`` activation recompute (full and selective):
           -> no-ops (global, applied once)        ``CheckpointFunction`` saves/restores the
                                                   CUDA RNG state around the recomputed forward
=========  ======================================  ==============================================

Rules: patches are applied only when no CUDA device is usable (``capabilities.have_cuda()``),
by ``megatron_rpt.distributed.initialize_model_parallel``; 'optckpt' also on a GPU machine
whenever Megatron's optimizer uses torch's Adam (no TE/Apex: the bugs are in that path); each can be switched off with
``MEGATRON_RPT_CPU_PATCHES`` (comma-separated names to apply, ``none`` for none; default all).
Every patch module states what it changes, why that is safe and when to remove it, and has a
``upstream_fails()`` probe that runs the unpatched upstream code path (the 'optckpt' probe needs
a model and an optimizer, so it is in the test itself); tests/unit/test_patches.py fails as
soon as a probe passes, i.e. when upstream no longer needs the patch.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from types import ModuleType

from megatron_rpt import capabilities
from megatron_rpt.patches import (
    cuda_current_device,
    cuda_rng_state,
    cuda_synchronize,
    cuda_to_cpu_mode,
    cuda_type_string,
    dist_optimizer_checkpoint,
)

logger = logging.getLogger(__name__)

PATCHES: dict[str, ModuleType] = {
    "device": cuda_current_device,
    "sync": cuda_synchronize,
    "mode": cuda_to_cpu_mode,
    "typestr": cuda_type_string,
    "optckpt": dist_optimizer_checkpoint,
    "rng": cuda_rng_state,
}
ENV_VAR = "MEGATRON_RPT_CPU_PATCHES"


def enabled_patches() -> list[str]:
    """Names selected by ``MEGATRON_RPT_CPU_PATCHES`` (default: all)."""
    raw = os.environ.get(ENV_VAR, "all").strip().lower()
    if raw in ("", "all"):
        return list(PATCHES)
    if raw == "none":
        return []
    names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PATCHES))
    if unknown:
        raise ValueError(f"{ENV_VAR}: unknown patch names {unknown}; known: {sorted(PATCHES)}")
    return names


def apply_cpu_patches() -> list[str]:
    """Apply the enabled global patches that this machine needs (idempotent).

    CPU-only patches are skipped when a GPU is usable; a patch module may decide for itself
    with a ``needed()`` function ('optckpt': whenever Megatron uses torch's Adam).
    """
    on_gpu = capabilities.have_cuda()
    applied = []
    for name in enabled_patches():
        module = PATCHES[name]
        needed = module.needed() if hasattr(module, "needed") else not on_gpu
        if needed and getattr(module, "GLOBAL", False) and not module.is_applied():
            module.apply()
            applied.append(name)
    if applied:
        logger.info("applied Megatron CPU patches: %s", ", ".join(applied))
    return applied


def cuda_device_mode() -> contextlib.AbstractContextManager:
    """Context for Megatron calls that allocate with ``device="cuda"`` (pipeline schedules).

    A no-op on GPU machines or when the 'mode' patch is switched off.
    """
    if capabilities.have_cuda() or "mode" not in enabled_patches():
        return contextlib.nullcontext()
    return cuda_to_cpu_mode.CudaToCpuMode()


def optimizer_mode() -> contextlib.AbstractContextManager:
    """Context for Megatron optimizer calls on CPU: the 'mode' and 'typestr' patches.

    A no-op on GPU machines; each part is skipped when switched off.
    """
    stack = contextlib.ExitStack()
    if not capabilities.have_cuda():
        names = enabled_patches()
        if "mode" in names:
            stack.enter_context(cuda_to_cpu_mode.CudaToCpuMode())
        if "typestr" in names:
            stack.enter_context(cuda_type_string.CudaTypeStringMode())
    return stack


@contextlib.contextmanager
def reverted(name: str) -> Iterator[None]:
    """Temporarily undo a global patch (for the probes in tests)."""
    module = PATCHES[name]
    was_applied = getattr(module, "GLOBAL", False) and module.is_applied()
    if was_applied:
        module.revert()
    try:
        yield
    finally:
        if was_applied:
            module.apply()


def is_cuda_failure(exc: BaseException) -> bool:
    """The error CPU-only torch raises when code asks for CUDA."""
    text = str(exc)
    return isinstance(exc, AssertionError | RuntimeError) and (
        "CUDA" in text or "cuda" in text or "NVIDIA" in text
    )


__all__ = [
    "PATCHES",
    "apply_cpu_patches",
    "cuda_device_mode",
    "enabled_patches",
    "optimizer_mode",
    "reverted",
]
