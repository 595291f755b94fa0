"""Megatron DDP, optimizer and LR scheduler for the policy model, wired into the schedules.

* ``wrap_ddp``: Megatron's ``DistributedDataParallel`` around each model chunk: gradients
  accumulate into one contiguous fp32 buffer per chunk (``grad_reduce_in_fp32``, so bf16
  models keep fp32 gradients across micro-batches) and are reduced over DP once per step
  (all-reduce, or reduce-scatter with the distributed optimizer), optionally overlapped with
  the backward pass. Later chunks of an interleaved pipeline are not bucketed (as in
  Megatron-LM).
* ``build_optimizer``: ``get_megatron_optimizer`` (Megatron's ``DistributedOptimizer`` when
  ``use_distributed_optimizer``, else the FP32 / Float16 optimizer) from our
  ``OptimizerConfig``. bf16 models get fp32 main params; the grad-norm clip runs over every
  TP/PP/DP shard. Without TE/Apex Megatron falls back to ``torch.optim.AdamW`` / ``SGD``.
* ``build_scheduler``: Megatron's ``OptimizerParamScheduler`` (constant / cosine / linear with
  linear warm-up, stepped once per optimizer step).
* ``attach_to_schedules``: the ``TransformerConfig`` hooks the schedules call (grad-sync
  control, ``finalize_model_grads`` without token rescaling, loss scaling).

On CPU, construction and ``step()`` run inside ``patches.optimizer_mode()`` (see
megatron_rpt/patches: CUDA device requests and CUDA type-string checks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from megatron_rpt import patches
from megatron_rpt.distributed import ParallelGroups
from megatron_rpt.dtypes import torch_dtype
from megatron_rpt.trainer.config import OptimizerConfig

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig


def wrap_ddp(
    chunks: list[torch.nn.Module],
    model_config: TransformerConfig,
    groups: ParallelGroups,
    cfg: OptimizerConfig,
) -> list[torch.nn.Module]:
    """Megatron ``DistributedDataParallel`` around each model chunk (in place of the chunks)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.overlap_grad_reduce,
        overlap_param_gather=cfg.overlap_param_gather,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    return [
        DistributedDataParallel(
            model_config,
            ddp_cfg,
            chunk,
            disable_bucketing=i > 0,
            pg_collection=groups.pg_collection,
        )
        for i, chunk in enumerate(chunks)
    ]


def megatron_optimizer_config(cfg: OptimizerConfig, dtype: str) -> Any:
    """Megatron-Core's ``OptimizerConfig`` for our config and the model dtype."""
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig

    return MegatronOptimizerConfig(
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        sgd_momentum=cfg.sgd_momentum,
        clip_grad=cfg.clip_grad,
        bf16=torch_dtype(dtype) == torch.bfloat16,
        params_dtype=torch_dtype(dtype),
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        overlap_param_gather=cfg.overlap_param_gather,
    )


def build_optimizer(
    ddp_chunks: list[torch.nn.Module], cfg: OptimizerConfig, groups: ParallelGroups, dtype: str
) -> Any:
    """Megatron optimizer (a ``ChainedOptimizer``) over the DDP-wrapped chunks."""
    from megatron.core.optimizer import get_megatron_optimizer

    with patches.optimizer_mode():
        return get_megatron_optimizer(
            megatron_optimizer_config(cfg, dtype),
            ddp_chunks,
            # Megatron refuses its extra gloo groups with an explicit pg_collection; they only
            # serve the legacy dp_zero checkpoint format, which is not used here.
            use_gloo_process_groups=False,
            pg_collection=groups.pg_collection,
        )


def build_scheduler(optimizer: Any, cfg: OptimizerConfig, total_steps: int) -> Any:
    """Megatron ``OptimizerParamScheduler``: warm-up then constant/cosine/linear decay."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_steps,
        lr_decay_steps=max(total_steps, cfg.lr_warmup_steps + 1),
        lr_decay_style=cfg.lr_schedule,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=1,  # unused: the weight decay is constant
        wd_incr_style="constant",
        # On resume the configured schedule is kept and only the step count is restored;
        # trainer/checkpoint.py refuses a checkpoint whose schedule differs in what matters.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def finalize_grads_without_token_scaling(
    model: list[torch.nn.Module],
    num_tokens: torch.Tensor | None,
    pg_collection: Any = None,
    force_all_reduce: bool = False,
) -> None:
    """Megatron's ``finalize_model_grads`` minus its division by the token count.

    With ``calculate_per_token_loss`` the schedules pass the summed ``num_tokens`` of the
    micro-batches here; our losses already divide by the global-batch denominator
    (trainer/forward.py), so the grads are finalized (DP reduction, tied-embedding and
    layernorm all-reduces) without rescaling.
    """
    from megatron.core.distributed import finalize_model_grads

    del num_tokens
    finalize_model_grads(
        model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce
    )


def attach_to_schedules(
    model_config: TransformerConfig,
    ddp_chunks: list[torch.nn.Module],
    optimizer: Any,
    cfg: OptimizerConfig,
) -> None:
    """Install the ``TransformerConfig`` hooks Megatron's schedules call (as Megatron-LM)."""

    def one_or_list(fns: list[Any]) -> Any:
        return fns[0] if len(fns) == 1 else fns

    if cfg.overlap_grad_reduce:
        model_config.no_sync_func = one_or_list([c.no_sync for c in ddp_chunks])
    if cfg.overlap_param_gather:
        model_config.param_sync_func = one_or_list([c.start_param_sync for c in ddp_chunks])
    model_config.finalize_model_grads_func = finalize_grads_without_token_scaling
    model_config.grad_scale_func = optimizer.scale_loss


def optimizer_step(optimizer: Any, scheduler: Any) -> tuple[bool, float, float]:
    """``optimizer.step()`` (grad norm, clip, update) then one scheduler step.

    Returns ``(update_successful, grad_norm, lr)``; the lr is the one the update used.
    """
    lr = current_lr(optimizer)
    with patches.optimizer_mode():
        success, grad_norm, _ = optimizer.step()
    if success:
        scheduler.step(increment=1)
    return bool(success), float(grad_norm if grad_norm is not None else float("nan")), lr


def current_lr(optimizer: Any) -> float:
    """Learning rate of the first parameter group (all groups share the schedule here)."""
    return float(optimizer.param_groups[0]["lr"])


def zero_grads(ddp_chunks: list[torch.nn.Module], optimizer: Any) -> None:
    """Clear the DDP grad buffers and the optimizer's grads before a step."""
    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()


__all__ = [
    "attach_to_schedules",
    "build_optimizer",
    "build_scheduler",
    "current_lr",
    "finalize_grads_without_token_scaling",
    "megatron_optimizer_config",
    "optimizer_step",
    "wrap_ddp",
    "zero_grads",
]
