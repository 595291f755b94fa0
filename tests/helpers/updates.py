"""A deterministic stand-in for an optimizer step, identical at every TP/PP layout (tests).

``perturb_parameters`` adds ``scale * N(0, 1)`` noise to every parameter. The noise of a
parameter is drawn for its *full* (unsharded) shape from a generator seeded by the HF tensor it
exports to, then cut to this rank's TP shard, so a TP=2 or PP=2 model ends up with exactly the
weights a TP=1 model gets from the same call. A tied output layer shares its seed with the
embedding (both map to ``model.embed_tokens.weight``), so tied weights stay tied across stages.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

from megatron_rpt.conversion.converter import WeightConverter
from megatron_rpt.conversion.tp_sharding import partitioning, tp_shard
from megatron_rpt.model.arch import ArchSpec
from megatron_rpt.model.parameters import named_global_parameters


@torch.no_grad()
def perturb_parameters(
    chunks: Sequence[torch.nn.Module],
    arch: ArchSpec,
    padded_vocab: int,
    tp_rank: int,
    tp_size: int,
    *,
    scale: float = 0.05,
    seed: int = 0,
) -> int:
    """Add the layout-independent noise to every parameter in place; return how many."""
    converter = WeightConverter(arch, padded_vocab)
    count = 0
    for name, param in named_global_parameters(chunks):
        part = partitioning(param) if tp_size > 1 else None
        full = list(param.shape)
        if part is not None:
            full[part[0]] *= tp_size
        key = converter.hf_names(name)[0]
        gen = torch.Generator().manual_seed(zlib.crc32(key.encode()) ^ seed)
        delta = torch.randn(full, generator=gen) * scale
        if part is not None:
            delta = tp_shard(delta, part[0], part[1], tp_rank, tp_size)
        param.add_(delta.to(device=param.device, dtype=param.dtype))
        count += 1
    return count
