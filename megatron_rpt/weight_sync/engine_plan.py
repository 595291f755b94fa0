"""Which part of each HF tensor an engine TP rank receives. Pure: no process groups.

The executor (gather.py) brings every full HF tensor to every rank of a model-parallel
replica: a PP broadcast, then a TP all-gather, both inside the replica. From there each trainer
rank cuts the payload of the engine TP rank that shares its GPU, so the engine's TP size never
has to match the trainer's and no bytes cross between data-parallel replicas:

* ``whole`` payloads (SGLang): every engine rank gets every full tensor, from its own GPU's
  memory; SGLang's weight loaders keep their TP rank's part themselves.
* sliced payloads (the HF engine, one process standing in for a TP engine): engine rank ``r``
  of ``E`` gets slice ``r`` of each tensor that an engine splits across TP, along the same
  dimension SGLang/vLLM split it (below); a tensor that is not split (norms, biases of
  row-parallel layers, FP8 scales) or whose dimension ``E`` does not divide travels once,
  from engine rank 0.

Split dimension of an HF tensor (Megatron's and the serving engines' column/row-parallel
convention)::

    q/k/v_proj, gate/up_proj (weight, bias), embed_tokens, lm_head   dim 0 (column / vocab)
    o_proj.weight, down_proj.weight                                  dim 1 (row)
    everything else                                                  not split

>>> import torch
>>> tensors = [("model.layers.0.mlp.down_proj.weight", torch.zeros(8, 6)),
...            ("model.norm.weight", torch.zeros(8))]
>>> [(p.name.split(".")[-2], tuple(p.tensor.shape), p.dim) for p in rank_pieces(tensors, 1, 2)]
[('down_proj', (8, 3), 1)]
>>> [(tuple(p.tensor.shape), p.dim) for p in rank_pieces(tensors, 0, 2)]
[((8, 3), 1), ((8,), None)]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_rpt.rollout.rank_shards import ShardPiece

_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW = ("o_proj", "down_proj")
_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def engine_split_dim(
    name: str, shape: Sequence[int], dtype: torch.dtype, engine_tp: int
) -> int | None:
    """Dimension ``name`` is split along across ``engine_tp`` engine ranks, or None.

    >>> engine_split_dim("model.layers.3.self_attn.q_proj.bias", (16,), torch.float32, 2)
    0
    >>> engine_split_dim("model.layers.3.self_attn.o_proj.bias", (16,), torch.float32, 2)
    >>> engine_split_dim("lm_head.weight", (15, 4), torch.float32, 2)  # 2 does not divide 15
    """
    if engine_tp == 1 or dtype.itemsize == 1 or name.endswith("weight_scale_inv"):
        return None  # FP8 weights and their block scales travel whole
    parts = name.split(".")
    module = parts[-2] if len(parts) >= 2 else ""
    if name in _VOCAB or module in _COLUMN:
        dim = 0
    elif module in _ROW and parts[-1] == "weight":
        dim = 1
    else:
        return None
    return dim if len(shape) > dim and shape[dim] % engine_tp == 0 else None


def rank_pieces(
    tensors: Sequence[tuple[str, torch.Tensor]],
    engine_rank: int,
    engine_tp: int,
    *,
    whole: bool = False,
) -> list[ShardPiece]:
    """Engine rank ``engine_rank``'s pieces of one bucket of full HF tensors (module docstring).

    Slices are fresh memory (``clone``), so a piece never keeps the full tensor alive and
    pickles only its own bytes.
    """
    if not 0 <= engine_rank < engine_tp:
        raise ValueError(f"engine rank {engine_rank} outside [0, {engine_tp})")
    out = []
    for name, tensor in tensors:
        if whole:
            out.append(ShardPiece(name, tensor, None, 0, 1))
            continue
        dim = engine_split_dim(name, tuple(tensor.shape), tensor.dtype, engine_tp)
        if dim is None:
            if engine_rank == 0:
                out.append(ShardPiece(name, tensor, None, 0, 1))
            continue
        part = tensor.chunk(engine_tp, dim)[engine_rank].clone()
        out.append(ShardPiece(name, part, dim, engine_rank, engine_tp))
    return out
