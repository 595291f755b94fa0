"""Configs of the policy update: optimizer and LR schedule, the training step, checkpoints.

Defaults follow the RPT paper where it says something (docs/METHOD.md §7): Adam with
betas (0.9, 0.999), weight decay 0.01, constant learning rate 1e-6, 256 contexts per step and
one optimizer step per rollout batch (exactly on-policy). The paper's "actor gradient clip
0.2" is most likely the PPO ratio clip; the gradient-norm clip here is Megatron's usual 1.0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_rpt.errors import ConfigError


@dataclass(kw_only=True)
class OptimizerConfig:
    """Megatron-Core optimizer (DistributedOptimizer by default) and learning-rate schedule."""

    optimizer: Literal["adam", "sgd"] = "adam"
    """'adam' (decoupled weight decay, i.e. AdamW, as Megatron's Adam is) or 'sgd' (plain SGD;
    its update is exactly -lr * grad, which the layout-invariance tests use)."""
    lr: float = 1e-6
    """Peak learning rate (paper: 1e-6, constant)."""
    min_lr: float = 0.0
    """Final learning rate of the cosine/linear schedules (ignored by 'constant')."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Decay after warm-up: constant (paper), cosine or linear down to min_lr at train.steps."""
    lr_warmup_steps: int = 0
    """Linear warm-up from 0 to lr over this many optimizer steps (the first step then has
    lr 0, as in Megatron-LM)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    sgd_momentum: float = 0.0
    """Momentum of 'sgd'."""
    weight_decay: float = 0.01
    """Decoupled weight decay (not applied to biases and norm weights, as in Megatron)."""
    clip_grad: float = 1.0
    """Clip the global gradient norm (over all TP/PP/DP shards) to this value; 0 disables."""
    use_distributed_optimizer: bool = True
    """Megatron's DistributedOptimizer: optimizer state and fp32 main params sharded over DP
    (ZeRO-1), gradients reduce-scattered instead of all-reduced."""
    overlap_grad_reduce: bool = False
    """Overlap the DP gradient reduction with the backward pass (bucketed)."""
    overlap_param_gather: bool = False
    """With the distributed optimizer: overlap the parameter all-gather with the next forward."""


@dataclass(kw_only=True)
class TrainConfig:
    """The training step: how many, how big, how rollouts become micro-batches."""

    steps: int = 1000
    """Optimizer steps of the run (paper: 1000); also the decay length of LR schedules."""
    contexts_per_step: int = 256
    """Contexts (prompts) per step; each contributes rollout.n_samples responses (paper: 256
    x 8 = 2048 sequences per optimizer step)."""
    max_tokens_per_microbatch: int = 16384
    """Token budget of one micro-batch per DP rank (prompt + response tokens; shared_prefix:
    each group's prompt once plus its responses; padded: rows x longest row). A sequence (or
    group) longer than the budget gets a micro-batch of its own (with a warning)."""
    micro_batch_layout: Literal["auto", "shared_prefix", "packed", "padded"] = "auto"
    """'auto': shared_prefix on the local (SDPA) layer spec, where it is tested against the
    separate layout; packed on the Transformer Engine spec until its shared-prefix attention
    call has run on a GPU (tests/gpu/test_shared_prefix_gpu.py). 'shared_prefix': packed, and the responses that share a prompt (a GRPO group) are laid
    out behind ONE copy of it, [ctx; r_1; ...; r_G], each response attending to the context and
    itself (same loss and gradients as 'packed'; the context's forward/backward runs once
    instead of G times; a group is never split over micro-batches); 'packed': the sequences of
    a micro-batch are concatenated into one row with Megatron's PackedSeqParams (THD; attention
    never crosses sequences), no padding; 'padded': a [rows, longest] right-padded batch
    (causal attention needs no mask for real tokens)."""
    log_interval: int = 1
    """Log step metrics every this many steps."""
    objective: Literal["rpt", "ntp", "rlp"] = "rpt"
    """'rpt': reinforcement pre-training (rollouts, reward, GRPO). 'rlp': RLP's
    information-gain reward for sampled thoughts against an EMA teacher (trainer/rlp.py, cfg.rlp;
    apply_rlp_recipe sets RLP's recipe). 'ntp': the plain
    next-token-prediction control on the same prepared data (train-split documents in windows
    of data.context_tokens tokens, cross-entropy through the same training step: advantage 1 on
    every token, on-policy ratio 1, temperature 1; no rollouts)."""


@dataclass(kw_only=True)
class CheckpointConfig:
    """Training checkpoints: model, optimizer, LR schedule, RNG states, step and loop state."""

    interval: int = 100
    """Save every this many optimizer steps (and at the end); 0 saves only at the end."""
    keep_last: int = 3
    """Keep the newest this many checkpoints of the run; older ones are deleted after a new one
    is complete. 0 keeps all."""
    save_optimizer: bool = True
    """Also save the optimizer state (needed to resume exactly; the model alone suffices for
    evaluation and HF export)."""
    optimizer_sharding: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    """DistributedOptimizer state format: 'dp_reshardable' (each rank writes its own shard;
    resumes at the same TP/PP with any DP size) or 'fully_reshardable' (gathered per
    parameter; resumes at any TP/PP/DP, slower to save)."""
    async_save: bool = False
    """Asynchronous checkpoint writing. Not implemented: must stay false."""
    load: str | None = None
    """Resume from this training checkpoint (a checkpoint dir, or a run's checkpoints dir:
    its latest). None starts from model.hf_path / model.megatron_checkpoint. The entry point's
    --resume sets it (auto: the run's own latest checkpoint, when there is one)."""
    export_hf_at_end: bool = False
    """After the last step, export the final checkpoint as an HF model directory to
    <run_dir>/hf (what RL fine-tuning frameworks load)."""


def validate_trainer_configs(
    optimizer: OptimizerConfig, train: TrainConfig, checkpoint: CheckpointConfig
) -> None:
    """Raise ConfigError naming the field when a value is out of range."""
    checks = [
        (optimizer.lr >= 0, "optimizer.lr", "must be >= 0"),
        (0 <= optimizer.min_lr <= optimizer.lr, "optimizer.min_lr", "must be in [0, optimizer.lr]"),
        (optimizer.lr_warmup_steps >= 0, "optimizer.lr_warmup_steps", "must be >= 0"),
        (
            optimizer.lr_warmup_steps < max(train.steps, 1),
            "optimizer.lr_warmup_steps",
            "must be < train.steps",
        ),
        (0 <= optimizer.adam_beta1 < 1, "optimizer.adam_beta1", "must be in [0, 1)"),
        (0 <= optimizer.adam_beta2 < 1, "optimizer.adam_beta2", "must be in [0, 1)"),
        (optimizer.adam_eps > 0, "optimizer.adam_eps", "must be > 0"),
        (0 <= optimizer.sgd_momentum < 1, "optimizer.sgd_momentum", "must be in [0, 1)"),
        (optimizer.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0"),
        (optimizer.clip_grad >= 0, "optimizer.clip_grad", "must be >= 0 (0 disables)"),
        (
            not optimizer.overlap_param_gather or optimizer.use_distributed_optimizer,
            "optimizer.overlap_param_gather",
            "needs optimizer.use_distributed_optimizer=true",
        ),
        (train.steps >= 1, "train.steps", "must be >= 1"),
        (train.contexts_per_step >= 1, "train.contexts_per_step", "must be >= 1"),
        (train.max_tokens_per_microbatch >= 2, "train.max_tokens_per_microbatch", "must be >= 2"),
        (train.log_interval >= 1, "train.log_interval", "must be >= 1"),
        (checkpoint.interval >= 0, "checkpoint.interval", "must be >= 0"),
        (checkpoint.keep_last >= 0, "checkpoint.keep_last", "must be >= 0 (0 keeps all)"),
        (not checkpoint.async_save, "checkpoint.async_save", "is not implemented; set false"),
    ]
    for ok, name, what in checks:
        if not ok:
            section, field = name.split(".")
            value = getattr(
                {"optimizer": optimizer, "train": train, "checkpoint": checkpoint}[section], field
            )
            raise ConfigError(f"{name} {what}, got {value!r}")


def check_interleaved_schedule(pp_size: int, vpp_size: int | None) -> None:
    """Training with virtual pipeline stages needs PP >= 3 (ConfigError otherwise).

    With two stages the previous and next pipeline rank are the same process, and the
    interleaved schedule's bidirectional exchange pairs its two sends/receives in the wrong
    order: activations and gradients are swapped silently (measured here: a grad norm of 14.09
    instead of 3.23). Megatron-LM PR #5271 / issue #5100. Forward-only use is not affected.
    """
    if vpp_size and pp_size == 2:
        raise ConfigError(
            "parallel.virtual_pipeline_model_parallel_size needs "
            "parallel.pipeline_model_parallel_size >= 3 for training: Megatron-Core 0.16.1's "
            "interleaved schedule swaps activations and gradients at PP=2 (Megatron-LM #5271)"
        )


def resolve_layout(layout: str, spec: str) -> str:
    """``train.micro_batch_layout`` with 'auto' resolved for the model's layer spec.

    >>> resolve_layout("auto", "local"), resolve_layout("auto", "te"), resolve_layout("padded", "te")
    ('shared_prefix', 'packed', 'padded')
    """
    if layout != "auto":
        return layout
    return "shared_prefix" if spec == "local" else "packed"


__all__ = [
    "CheckpointConfig",
    "OptimizerConfig",
    "TrainConfig",
    "check_interleaved_schedule",
    "resolve_layout",
    "validate_trainer_configs",
]
