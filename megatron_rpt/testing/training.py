"""Helpers for trainer tests: deterministic rollout batches, full-parameter gathers, a setup.

* ``random_rollout_batch``: sequences of uneven prompt/response lengths with fixed advantages
  (half positive, half negative) and given rollout log-probs, from a seed.
* ``gather_full_parameters``: this pipeline stage's parameters under canonical (global-layer)
  names, TP shards gathered into full tensors; merge the dicts of all stages for the model.
* ``build_train_step``: model from an HF dir + ``TrainStep`` at the current layout.
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


def gather_full_parameters(modules: list[torch.nn.Module], groups: Any) -> dict[str, torch.Tensor]:
    """{canonical name: full fp32 CPU tensor} of this stage's parameters (TP shards gathered)."""
    from megatron_rpt.conversion.converter import named_global_parameters
    from megatron_rpt.conversion.tp_sharding import partitioning, tp_unshard

    out = {}
    for name, param in named_global_parameters(modules):
        tensor = param.detach().float()
        part = partitioning(param)
        if part is not None and groups.tp_size > 1:
            shards = [torch.empty_like(tensor) for _ in range(groups.tp_size)]
            dist.all_gather(shards, tensor.contiguous(), group=groups.tp_group)
            tensor = tp_unshard(shards, part[0], part[1])
        out[name] = tensor.cpu().clone()
    return out


def build_train_step(
    hf_dir: str,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    dtype: str = "fp32",
    optimizer: Any = None,
    train: Any = None,
    loss: Any = None,
    temperature: float = 1.0,
    seed: int = 0,
    megatron_checkpoint: str | None = None,
    spec: str = "local",
    precision: Any = None,
) -> Any:
    """Initialise the layout, build the model from ``hf_dir`` and wrap it in a ``TrainStep``.

    ``spec`` / ``precision``: layer spec and ``PrecisionConfig`` (FP8 tests on GPU).
    """
    from megatron_rpt.distributed import initialize_model_parallel, seed_model_parallel
    from megatron_rpt.loss.config import LossConfig
    from megatron_rpt.model.config import ModelConfig, ParallelConfig
    from megatron_rpt.model.loading import build_pretrained
    from megatron_rpt.trainer.config import OptimizerConfig, TrainConfig
    from megatron_rpt.trainer.step import TrainStep

    groups = initialize_model_parallel(tp, pp, vpp)
    seed_model_parallel(seed, groups)
    parallel = ParallelConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
    )
    model_cfg = ModelConfig(
        hf_path=hf_dir,
        dtype=dtype,
        spec=spec,  # type: ignore[arg-type]
        megatron_checkpoint=megatron_checkpoint,  # type: ignore[arg-type]
    )
    built = build_pretrained(model_cfg, parallel, groups, output="hidden", precision=precision)
    return TrainStep(
        built,
        groups,
        optimizer=optimizer or OptimizerConfig(),
        train=train or TrainConfig(),
        loss=loss or LossConfig(),
        temperature=temperature,
    )


__all__ = ["build_train_step", "gather_full_parameters", "random_rollout_batch"]
