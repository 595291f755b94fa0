"""Executor of a ``SyncPlan``: per bucket, PP broadcast -> TP all-gather -> convert -> yield.

``collect_metadata`` runs once (its result is cached with the plan); ``iter_hf_buckets`` runs
at every sync on every rank of the model-parallel group, in plan order, so all ranks issue the
same collectives in the same order:

1. **Shards.** The owning stage reads its parameter (no copy: a contiguous detached view);
   the other stages allocate an empty shard of the same local shape.
2. **PP broadcast** (``pp_size > 1``): each shard travels from the owning stage to every
   stage over the PP group, i.e. between ranks of equal TP rank, so only 1/TP of a tensor
   crosses each pipeline link. All broadcasts of a bucket are in flight together.
3. **TP all-gather** (partitioned parameters, ``tp_size > 1``): every TP rank receives every
   shard (contiguous tensors: gloo corrupts non-contiguous ones) and ``tp_unshard`` rebuilds
   the full tensor from ``partition_dim`` / ``partition_stride``.
4. **Convert** each full tensor with the name table (``WeightConverter.megatron_to_hf``: QKV
   and gate/up split, vocabulary padding rows dropped, the tied output layer never emitted)
   and cast to the push dtype; with the plan's FP8 quantization, decoder linear weights are
   quantized from the full-precision tensor instead (fp8.py), each followed by its scale.
5. **Yield** one ``HFBucket``; the next bucket's collectives start only when the consumer asks
   for it.

Memory: the generator keeps no reference to a bucket it has yielded, and frees each gathered
piece as soon as it is converted, so beyond the model the executor holds about one bucket
(plus one parameter's pieces while unsharding) - provided the consumer drops the bucket before
asking for the next one (tests/distributed/test_weight_sync.py checks this with storage
weakrefs). Tensors in a bucket are never written again by the sync, but at TP = 1 on the owning
stage identity-mapped tensors are *views of the parameters*: read them, do not modify them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_rpt.conversion.converter import WeightConverter
from megatron_rpt.conversion.tp_sharding import partitioning, tp_unshard
from megatron_rpt.distributed import ParallelGroups
from megatron_rpt.model.arch import ArchSpec
from megatron_rpt.model.parameters import named_global_parameters
from megatron_rpt.weight_sync.fp8 import BlockFP8
from megatron_rpt.weight_sync.plan import Bucket, ParamMeta, ParamTask, SyncPlan


@dataclass
class HFBucket:
    """One bucket of converted HF tensors, in plan order."""

    index: int
    tensors: list[tuple[str, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        """Bytes of the bucket's HF tensors."""
        return sum(t.numel() * t.element_size() for _, t in self.tensors)


def local_param_metadata(chunks: Sequence[torch.nn.Module], pp_rank: int) -> list[ParamMeta]:
    """``ParamMeta`` of this rank's parameters, in model order (all chunks of this stage)."""
    metas = []
    for name, param in named_global_parameters(chunks):
        part = partitioning(param)
        metas.append(
            ParamMeta(
                name=name,
                local_shape=tuple(param.shape),
                dtype=param.dtype,
                partition_dim=None if part is None else part[0],
                partition_stride=1 if part is None else part[1],
                pp_rank=pp_rank,
            )
        )
    return metas


def collect_metadata(
    chunks: Sequence[torch.nn.Module], groups: ParallelGroups
) -> list[list[ParamMeta]]:
    """Every stage's metadata, by PP rank (``all_gather_object`` over the PP group).

    TP ranks of one stage report identical metadata (equal local shapes), so every PP group
    gathers the same lists and every rank can plan alone.
    """
    local = local_param_metadata(chunks, groups.pp_rank)
    if groups.pp_size == 1:
        return [local]
    stages: list[Any] = [None] * groups.pp_size
    dist.all_gather_object(stages, local, group=groups.pp_group)
    return stages


def iter_hf_buckets(
    plan: SyncPlan,
    chunks: Sequence[torch.nn.Module],
    groups: ParallelGroups,
    arch: ArchSpec,
    padded_vocab: int,
    *,
    materialize: bool = True,
) -> Iterator[HFBucket]:
    """Yield the plan's buckets as HF tensors (module docstring); collective over TP x PP.

    ``materialize=False`` (ranks that push nothing) joins the collectives but skips unsharding
    and conversion, yielding empty buckets.
    """
    assert (plan.tp_size, plan.pp_size) == (groups.tp_size, groups.pp_size), (
        "plan was made for another parallel layout"
    )
    params = dict(named_global_parameters(chunks))
    device = next(iter(params.values())).device
    converter = WeightConverter(arch, padded_vocab)
    for bucket in plan.buckets:
        # `yield <call>` keeps no local reference to the bucket once it is handed out.
        yield HFBucket(
            bucket.index,
            _gather_convert(
                bucket, params, groups, converter, device, materialize, plan.quantization
            ),
        )


def _gather_convert(
    bucket: Bucket,
    params: dict[str, torch.nn.Parameter],
    groups: ParallelGroups,
    converter: WeightConverter,
    device: torch.device,
    materialize: bool,
    quantization: BlockFP8 | None,
) -> list[tuple[str, torch.Tensor]]:
    with torch.no_grad():
        shards = [_local_shard(task, params, groups.pp_rank, device) for task in bucket.tasks]
        if groups.pp_size > 1:
            _pp_broadcast(bucket.tasks, shards, groups)
        pieces = _tp_all_gather(bucket.tasks, shards, groups)
        del shards
        out: list[tuple[str, torch.Tensor]] = []
        if not materialize:
            return out
        for i, task in enumerate(bucket.tasks):
            parts, pieces[i] = pieces[i], None  # free this parameter's pieces once converted
            full = parts[0] if task.partition_dim is None else _unshard(parts, task)
            del parts
            out.extend(_convert(task, full, converter, quantization))
            del full
        return out


def _local_shard(
    task: ParamTask, params: dict[str, torch.nn.Parameter], pp_rank: int, device: torch.device
) -> torch.Tensor:
    if task.owner_pp_rank != pp_rank:
        return torch.empty(task.local_shape, dtype=task.dtype, device=device)
    param = params.get(task.name)
    assert param is not None, f"stage {pp_rank} owns {task.name} but does not hold it"
    assert tuple(param.shape) == task.local_shape and param.dtype == task.dtype, (
        f"{task.name} changed shape or dtype since the plan was made"
    )
    return param.detach().contiguous()


def _pp_broadcast(
    tasks: Sequence[ParamTask], shards: list[torch.Tensor], groups: ParallelGroups
) -> None:
    stage_ranks = dist.get_process_group_ranks(groups.pp_group)  # global rank of each stage
    works = [
        dist.broadcast(
            shard, src=stage_ranks[task.owner_pp_rank], group=groups.pp_group, async_op=True
        )
        for task, shard in zip(tasks, shards, strict=True)
    ]
    for work in works:
        work.wait()


def _tp_all_gather(
    tasks: Sequence[ParamTask], shards: list[torch.Tensor], groups: ParallelGroups
) -> list[list[torch.Tensor] | None]:
    """Per task: every TP rank's shard in rank order ([shard] for replicated tensors)."""
    pieces: list[list[torch.Tensor] | None] = []
    works = []
    for task, shard in zip(tasks, shards, strict=True):
        if task.partition_dim is None or groups.tp_size == 1:
            pieces.append([shard])
            continue
        parts = [torch.empty_like(shard) for _ in range(groups.tp_size)]
        works.append(dist.all_gather(parts, shard, group=groups.tp_group, async_op=True))
        pieces.append(parts)
    for work in works:
        work.wait()
    return pieces


def _unshard(parts: list[torch.Tensor], task: ParamTask) -> torch.Tensor:
    assert task.partition_dim is not None
    full = tp_unshard(parts, task.partition_dim, task.partition_stride)
    assert tuple(full.shape) == task.full_shape, (task.name, full.shape, task.full_shape)
    return full


def _convert(
    task: ParamTask,
    full: torch.Tensor,
    converter: WeightConverter,
    quantization: BlockFP8 | None,
) -> list[tuple[str, torch.Tensor]]:
    converted = converter.megatron_to_hf(task.name, full)
    if quantization is not None:
        converted = [pair for n, t in converted for pair in quantization.quantize(n, t)]
    assert [n for n, _ in converted] == [o.name for o in task.outputs], task.name
    out = []
    for (name, tensor), spec in zip(converted, task.outputs, strict=True):
        assert tuple(tensor.shape) == spec.shape, (name, tensor.shape, spec.shape)
        out.append((name, tensor if tensor.dtype == spec.dtype else tensor.to(spec.dtype)))
    return out
