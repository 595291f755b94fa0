"""Helpers for trainer tests: deterministic rollout batches, full-parameter gathers, a setup.

* ``random_rollout_batch``: sequences of uneven prompt/response lengths with fixed advantages
  (half positive, half negative) and given rollout log-probs, from a seed.
* ``random_group_batch``: GRPO-shaped groups (G responses sharing one prompt), random sizes.
* ``gather_full_parameters`` / ``gather_full_gradients``: this pipeline stage's parameters
  (or their reduced gradients) under canonical (global-layer) names, TP shards gathered into
  full tensors; merge the dicts of all stages for the model.
* ``build_policy_trainer``: model from an HF dir + ``PolicyTrainer`` at the current layout.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_rpt.trainer.batch import RolloutBatch, TrainSequence

DEFAULT_SHAPES = ((5, 4), (3, 9), (11, 2), (4, 6), (7, 3), (2, 8))


def random_rollout_batch(
    vocab: int,
    *,
    shapes: tuple[tuple[int, int], ...] = DEFAULT_SHAPES,
    advantages: tuple[float, ...] | None = None,
    seed: int = 0,
) -> RolloutBatch:
    """Sequences with ``(prompt_len, response_len)`` from ``shapes``; advantages alternate
    +1/-1 scaled by (1 + index/10) unless given; rollout log-probs are filled with -1."""
    gen = torch.Generator().manual_seed(seed)
    if advantages is None:
        advantages = tuple((1.0 if i % 2 == 0 else -1.0) * (1 + i / 10) for i in range(len(shapes)))
    sequences = [
        TrainSequence(
            prompt_ids=torch.randint(0, vocab, (p,), generator=gen),
            response_ids=torch.randint(0, vocab, (r,), generator=gen),
            rollout_logprobs=torch.full((r,), -1.0),
            advantage=a,
            group_id=i // 2,
            reward=float(a > 0),
        )
        for i, ((p, r), a) in enumerate(zip(shapes, advantages, strict=True))
    ]
    return RolloutBatch(sequences)


def random_group_batch(
    vocab: int,
    *,
    num_groups: int = 4,
    prompt_lens: tuple[int, int] = (3, 14),
    group_sizes: tuple[int, int] = (1, 4),
    response_lens: tuple[int, int] = (1, 8),
    old_logprob: float | None = None,
    seed: int = 0,
) -> RolloutBatch:
    """``num_groups`` contexts, each with G responses (sizes drawn uniformly from the inclusive
    ranges); the G sequences of a group share one prompt tensor's ids and its ``group_id``.
    Advantages are standard normal, rollout log-probs -1; ``old_logprob`` (e.g. log(1/V))
    makes the step off-policy, so that the loss value depends on the model (on-policy, the
    PPO ratio is 1 and the loss is -mean(advantage)). Groups are interleaved in the batch
    (response j of every group, then j + 1, ...), as no loop is required to keep them together.
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(lo_hi: tuple[int, int]) -> int:
        return int(torch.randint(lo_hi[0], lo_hi[1] + 1, (1,), generator=gen))

    groups = []
    for g in range(num_groups):
        prompt = torch.randint(0, vocab, (draw(prompt_lens),), generator=gen)
        members = []
        for _ in range(draw(group_sizes)):
            r = draw(response_lens)
            members.append(
                TrainSequence(
                    prompt_ids=prompt.clone(),
                    response_ids=torch.randint(0, vocab, (r,), generator=gen),
                    rollout_logprobs=torch.full((r,), -1.0),
                    advantage=float(torch.randn((), generator=gen)),
                    group_id=g,
                    old_logprobs=None if old_logprob is None else torch.full((r,), old_logprob),
                )
            )
        groups.append(members)
    width = max(len(m) for m in groups)
    return RolloutBatch([m[j] for j in range(width) for m in groups if j < len(m)])


def gather_full_parameters(modules: list[torch.nn.Module], groups: Any) -> dict[str, torch.Tensor]:
    """{canonical name: full fp32 CPU tensor} of this stage's parameters (TP shards gathered)."""
    return _gather_full(modules, groups, lambda param: param.detach())


def gather_full_gradients(modules: list[torch.nn.Module], groups: Any) -> dict[str, torch.Tensor]:
    """Like ``gather_full_parameters`` for the gradients Megatron's DDP reduced into
    ``param.main_grad`` during the last ``train_step`` (kept until the next one zeroes them;
    not clipped when ``optimizer.clip_grad`` = 0). Needs the non-distributed optimizer (the
    DistributedOptimizer leaves each DP rank only its shard)."""
    return _gather_full(modules, groups, lambda param: param.main_grad)


def _gather_full(modules: list[torch.nn.Module], groups: Any, pick: Any) -> dict[str, torch.Tensor]:
    from megatron_rpt.conversion.tp_sharding import partitioning, tp_unshard
    from megatron_rpt.model.parameters import named_global_parameters

    out = {}
    for name, param in named_global_parameters(modules):
        tensor = pick(param).detach().float()
        part = partitioning(param)
        if part is not None and groups.tp_size > 1:
            shards = [torch.empty_like(tensor) for _ in range(groups.tp_size)]
            dist.all_gather(shards, tensor.contiguous(), group=groups.tp_group)
            tensor = tp_unshard(shards, part[0], part[1])
        out[name] = tensor.cpu().clone()
    return out


def build_policy_trainer(
    hf_dir: str,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    dtype: str = "fp32",
    spec: str = "local",
    optimizer: Any = None,
    train: Any = None,
    loss: Any = None,
    temperature: float = 1.0,
    seed: int = 0,
    megatron_checkpoint: str | None = None,
    precision: Any = None,
    sequence_parallel: bool = False,
    recompute: str = "none",
    cp: int = 1,
) -> Any:
    """Initialise the layout, build the model from ``hf_dir`` and wrap it in a ``PolicyTrainer``.

    ``spec`` / ``precision``: layer spec and ``PrecisionConfig`` (FP8 tests on GPU);
    ``recompute``: ``model.recompute_granularity`` (none, selective, full); ``cp``: context
    parallelism (GPU, TE spec).
    """
    from megatron_rpt.checkpoint.loading import build_pretrained
    from megatron_rpt.distributed import initialize_model_parallel, seed_model_parallel
    from megatron_rpt.loss.config import LossConfig
    from megatron_rpt.model.config import ModelConfig, ParallelConfig
    from megatron_rpt.trainer.config import OptimizerConfig, TrainConfig
    from megatron_rpt.trainer.step import PolicyTrainer

    groups = initialize_model_parallel(
        tp, pp, vpp, **({"context_parallel_size": cp} if cp > 1 else {})
    )
    seed_model_parallel(seed, groups)
    parallel = ParallelConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=sequence_parallel,
        context_parallel_size=cp,
    )
    model_cfg = ModelConfig(
        recompute_granularity=recompute,  # type: ignore[arg-type]
        hf_path=hf_dir,
        dtype=dtype,
        spec=spec,  # type: ignore[arg-type]
        megatron_checkpoint=megatron_checkpoint,  # type: ignore[arg-type]
    )
    built = build_pretrained(model_cfg, parallel, groups, output="hidden", precision=precision)
    return PolicyTrainer(
        built,
        groups,
        optimizer=optimizer or OptimizerConfig(),
        train=train or TrainConfig(),
        loss=loss or LossConfig(),
        temperature=temperature,
    )


def sgd_step_gradients(
    hf_dir: str, layout: str, batch: RolloutBatch, *, budget: int, **build: Any
) -> dict[str, Any]:
    """One plain-SGD step (no clipping, no weight decay) on ``batch``: the log-probs before it,
    its loss, grad norm, batch statistics, ``token_alignment`` and the full reduced gradients.

    ``build``: further ``build_policy_trainer`` keywords (tp, pp, vpp, dtype, sequence_parallel,
    recompute, ...); ``budget``: ``train.max_tokens_per_microbatch``.
    """
    from megatron_rpt.trainer.config import OptimizerConfig, TrainConfig

    sgd = OptimizerConfig(
        optimizer="sgd", lr=1e-3, weight_decay=0.0, clip_grad=0.0, use_distributed_optimizer=False
    )
    ts = build_policy_trainer(
        hf_dir,
        optimizer=sgd,
        train=TrainConfig(max_tokens_per_microbatch=budget, micro_batch_layout=layout),
        **build,
    )
    logprobs = ts.compute_logprobs(batch)
    metrics = ts.train_step(batch)
    return {
        "loss": metrics.loss,
        "grad_norm": metrics.grad_norm,
        "logprobs": logprobs,
        "layout_tokens": metrics.batch["layout_tokens"],
        "micro_batches": metrics.batch["micro_batches"],
        "alignment": ts.token_alignment,
        "grads": gather_full_gradients(ts.model_modules, ts.groups),
    }


__all__ = [
    "build_policy_trainer",
    "gather_full_gradients",
    "gather_full_parameters",
    "random_group_batch",
    "random_rollout_batch",
    "sgd_step_gradients",
]
