"""Tensor-parallel sharding of full Megatron tensors, as Megatron's parallel layers lay it out.

Megatron marks every TP-split parameter with ``tensor_model_parallel=True``, its
``partition_dim`` and a ``partition_stride``. With stride s the full tensor is cut into
``s * tp`` equal blocks along ``partition_dim`` and rank r holds blocks ``r, r + tp, ...``
concatenated. Stride 1 is a plain contiguous split (QKV by whole KV groups, embeddings and the
output layer by vocabulary rows, row-parallel weights by input columns); the SwiGLU
``linear_fc1`` uses stride 2, so each rank holds ``[gate_r; up_r]``.

>>> import torch
>>> full = torch.arange(8)
>>> [tp_shard(full, 0, 2, r, 2).tolist() for r in range(2)]
[[0, 1, 4, 5], [2, 3, 6, 7]]
>>> tp_unshard([tp_shard(full, 0, 2, r, 2) for r in range(2)], 0, 2).tolist()
[0, 1, 2, 3, 4, 5, 6, 7]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def partitioning(param: torch.Tensor) -> tuple[int, int] | None:
    """(partition_dim, stride) of a Megatron parameter, or None when TP-replicated."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    return int(param.partition_dim), int(getattr(param, "partition_stride", 1))


def tp_shard(
    full: torch.Tensor, partition_dim: int, stride: int, tp_rank: int, tp_size: int
) -> torch.Tensor:
    """This rank's shard of ``full`` (contiguous)."""
    if tp_size == 1:
        return full
    blocks = _blocks(full, partition_dim, stride * tp_size)
    return torch.cat(blocks[tp_rank::tp_size], dim=partition_dim).contiguous()


def tp_unshard(shards: Sequence[torch.Tensor], partition_dim: int, stride: int) -> torch.Tensor:
    """Inverse of ``tp_shard``: the full tensor from every rank's shard (in rank order)."""
    if len(shards) == 1:
        return shards[0]
    per_rank = [_blocks(s, partition_dim, stride) for s in shards]
    ordered = [per_rank[r][j] for j in range(stride) for r in range(len(shards))]
    return torch.cat(ordered, dim=partition_dim)


def _blocks(t: torch.Tensor, dim: int, n: int) -> list[torch.Tensor]:
    size = t.shape[dim]
    if size % n:
        raise ValueError(f"dimension {dim} of size {size} does not split into {n} equal blocks")
    return list(torch.split(t, size // n, dim=dim))
