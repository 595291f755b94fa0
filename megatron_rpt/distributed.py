"""The only module that touches ``megatron.core.parallel_state``.

``world_process_group`` starts torch.distributed (from torchrun's environment, or one process
without a launcher); ``initialize_model_parallel`` creates Megatron's TP/PP/DP groups
(torch.distributed must already be initialised, by ``world_process_group``,
``single_process_group`` or a test harness) and returns a frozen
``ParallelGroups`` with the groups, this rank's coordinates and Megatron's
``ProcessGroupCollection``. Everything else in megatron_rpt receives groups as explicit
arguments instead of reading Megatron's globals.

On a machine without a GPU the CPU patches of ``megatron_rpt.patches`` are applied here, once,
before any Megatron model exists, and seeding uses Megatron's inference RNG tracker (a no-op
tracker, so the CUDA RNG is never touched; dropout inside TP regions then uses the CPU
generator and is not TP-rank-specific).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megatron_rpt import capabilities, patches

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelGroups:
    """Process groups and coordinates of this rank (built by ``initialize_model_parallel``)."""

    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    vpp_size: int | None
    pg_collection: ProcessGroupCollection
    """Megatron's collection with every default group (tp, pp, dp, mp, ...)."""
    cp_group: dist.ProcessGroup | None = None
    """Context-parallel group (ranks that hold parts of the same sequences); None: CP = 1."""
    cp_rank: int = 0
    cp_size: int = 1
    dp_cp_group: dist.ProcessGroup | None = None
    """Data x context-parallel group (where Megatron's DDP reduces gradients); None: CP = 1."""

    @property
    def is_first_stage(self) -> bool:
        """This rank holds the first pipeline stage (the embedding)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """This rank holds the last pipeline stage (final norm and output layer)."""
        return self.pp_rank == self.pp_size - 1

    @property
    def num_chunks(self) -> int:
        """Model chunks on this rank (virtual pipeline stages)."""
        return self.vpp_size or 1

    def stage_flags(self, vp_stage: int = 0) -> tuple[bool, bool]:
        """(pre_process, post_process) of model chunk ``vp_stage`` on this rank."""
        pre = self.is_first_stage and vp_stage == 0
        post = self.is_last_stage and vp_stage == self.num_chunks - 1
        return pre, post


def initialize_model_parallel(
    tp: int = 1, pp: int = 1, vpp: int | None = None, **megatron_kwargs: Any
) -> ParallelGroups:
    """Create Megatron's model-parallel groups and return them (call once per layout).

    ``megatron_kwargs`` go to ``parallel_state.initialize_model_parallel`` unchanged (e.g.
    ``context_parallel_size``). torch.distributed must be initialised.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised (use a launcher, or "
            "megatron_rpt.distributed.single_process_group())"
        )
    _apply_cpu_patches()
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by TP x PP = {tp} x {pp}")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        **megatron_kwargs,
    )
    groups = ParallelGroups(
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        tp_size=tp,
        pp_size=pp,
        dp_size=ps.get_data_parallel_world_size(),
        vpp_size=vpp,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        **_cp_fields(ps),
    )
    logger.debug("model parallel initialised: %s", groups)
    return groups


def _cp_fields(ps: Any) -> dict[str, Any]:
    """The context-parallel entries of ``ParallelGroups`` (defaults when CP = 1)."""
    cp_size = ps.get_context_parallel_world_size()
    if cp_size == 1:
        return {}
    return dict(
        cp_group=ps.get_context_parallel_group(),
        cp_rank=ps.get_context_parallel_rank(),
        cp_size=cp_size,
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
    )


def destroy_model_parallel() -> None:
    """Tear down Megatron's groups (torch.distributed itself stays initialised)."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()


def seed_model_parallel(seed: int, groups: ParallelGroups) -> None:
    """Seed python/numpy/torch and Megatron's model-parallel RNG tracker.

    Pipeline stages get distinct seeds (``seed + 100 * pp_rank``, as Megatron-LM does); on CPU
    the inference RNG tracker is used (see the module docstring).
    """
    import numpy as np
    from megatron.core import tensor_parallel

    stage_seed = seed + 100 * groups.pp_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(
        stage_seed, inference_rng_tracker=not capabilities.have_cuda()
    )


@contextlib.contextmanager
def single_process_group(timeout_s: float = 600.0) -> Iterator[bool]:
    """Make sure a torch.distributed group exists; create a 1-rank gloo group if none does.

    Yields True when this call created the group; it is destroyed again on exit (together with
    Megatron's model-parallel state), so a library call can build Megatron models in a plain
    Python process (CLIs, notebooks, tests) and leave it as it found it.
    """
    if dist.is_initialized():
        yield False
        return
    _init_one_process("gloo", timedelta(seconds=timeout_s))
    try:
        yield True
    finally:
        with contextlib.suppress(Exception):
            destroy_model_parallel()
        dist.destroy_process_group()


@contextlib.contextmanager
def world_process_group(timeout: timedelta) -> Iterator[bool]:
    """torch.distributed from torchrun's environment, or one process without a launcher.

    NCCL on GPUs, gloo on CPU. A group that already exists (a test harness, a notebook) is
    used as it is and left in place; yields True when this call created the group, which is
    then destroyed on exit.
    """
    if dist.is_initialized():
        yield False
        return
    backend = "nccl" if capabilities.have_cuda() else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timeout)
    else:
        if backend == "nccl":
            torch.cuda.set_device(0)
        _init_one_process(backend, timeout)
    try:
        yield True
    finally:
        dist.destroy_process_group()


def _init_one_process(backend: str, timeout: timedelta) -> None:
    # An in-memory store: no port, no environment variables, nothing visible outside.
    dist.init_process_group(
        backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
    )


def _apply_cpu_patches() -> None:
    # CPU-only patches are skipped on GPU machines inside apply_cpu_patches; the optimizer
    # checkpoint fixes apply wherever Megatron falls back to torch's Adam.
    patches.apply_cpu_patches()


__all__ = [
    "ParallelGroups",
    "destroy_model_parallel",
    "initialize_model_parallel",
    "seed_model_parallel",
    "single_process_group",
    "world_process_group",
]
