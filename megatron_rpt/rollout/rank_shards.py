"""Per-engine-rank weight shards: what one engine TP rank receives, and how an engine that
runs in one process (the HF engine) puts the ranks' shards back together. Pure.

A colocated engine of TP size ``E`` has one rank on each of ``E`` GPUs; each rank receives
its part of every HF tensor from the trainer rank on the *same* GPU (weight_sync/per_engine.py).
A ``ShardPiece`` is one such part: the rank's slice along ``dim`` (``index`` of ``count``
equal slices), or the whole tensor (``dim is None``).

>>> import torch
>>> w = torch.arange(12.0).reshape(4, 3)
>>> ranks = [[ShardPiece("w", w.chunk(2, 0)[r], 0, r, 2)] for r in range(2)]
>>> torch.equal(assemble_shards(ranks)[0][1], w)
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class ShardPiece(NamedTuple):
    """One engine rank's part of one HF tensor."""

    name: str
    """HF tensor name."""
    tensor: torch.Tensor
    """The slice (or the whole tensor when ``dim`` is None)."""
    dim: int | None
    """Dimension the HF tensor is split along across the engine's ranks; None: not split."""
    index: int
    """Which of the ``count`` equal slices this is (the engine TP rank)."""
    count: int
    """Number of slices (the engine TP size; 1 when not split)."""


def assemble_shards(per_rank: Sequence[Sequence[ShardPiece]]) -> list[tuple[str, torch.Tensor]]:
    """Full ``(hf_name, tensor)`` pairs from every engine rank's pieces of one bucket.

    ``per_rank[r]`` is rank r's list. A split tensor needs exactly one piece per slice index
    (concatenated in index order along ``dim``); an unsplit one comes from a single rank.
    Order: first appearance across ranks in rank order. Raises ValueError for missing,
    duplicated or inconsistent pieces (a planning bug must not load half a tensor).
    """
    order: list[str] = []
    pieces: dict[str, list[ShardPiece]] = {}
    for rank_pieces in per_rank:
        for piece in rank_pieces:
            if piece.name not in pieces:
                order.append(piece.name)
            pieces.setdefault(piece.name, []).append(piece)
    out = []
    for name in order:
        group = sorted(pieces[name], key=lambda p: p.index)
        first = group[0]
        if first.dim is None:
            if len(group) != 1:
                raise ValueError(f"unsplit tensor {name!r} sent by {len(group)} ranks")
            out.append((name, first.tensor))
            continue
        if [p.index for p in group] != list(range(first.count)) or any(
            (p.dim, p.count) != (first.dim, first.count) for p in group
        ):
            raise ValueError(
                f"tensor {name!r}: pieces {[(p.dim, p.index, p.count) for p in group]} do not "
                f"cover {first.count} slices along one dimension"
            )
        out.append((name, torch.cat([p.tensor for p in group], dim=first.dim)))
    return out
