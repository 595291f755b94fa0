"""The shared-prefix micro-batch layout: each context once, followed by all its responses.

Pure torch (no torch.distributed, no Megatron). ``trainer/batch.py`` uses it for
``train.micro_batch_layout = "shared_prefix"``; the attention contract (pieces, RoPE by
position id) is in model/shared_prefix.py.

**Groups.** Sequences whose prompt token ids are identical form one group (found by
``prefix_groups``; ``TrainSequence.group_id`` is not trusted for this: identical prompts are
what makes sharing exact, and a loop that hands G responses of one context produces them).
A group is the unit of DP partitioning and micro-batching: it is never split.

**Row.** One packed row per micro-batch; group g with context ``c`` (P tokens) and responses
``r_1..r_G`` occupies one segment ``[c; r_1; ...; r_G]`` with positions ``0..P-1`` then
``P..P+R_i-1`` for every response. A group of one response is exactly the packed layout's
sequence. Token count: ``P + sum_i R_i`` instead of ``G * P + sum_i R_i``.

**Log-probs.** Response tokens are predicted by the last context slot (first token, shared by
the group) and the response's own slots (``loss.logprobs.shared_prefix_response_positions``).
Responses are laid out group by group; ``order`` gives the batch index of each, and every
per-token tensor of the micro-batch follows it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_rpt.loss.logprobs import ResponseIndex, shared_prefix_response_positions
from megatron_rpt.model.shared_prefix import Piece, group_pieces


def prefix_groups(sequences: Sequence[Any], indices: Iterable[int]) -> list[list[int]]:
    """``indices`` grouped by identical prompt ids, groups and members in first-seen order.

    >>> from types import SimpleNamespace as S
    >>> seqs = [S(prompt_ids=torch.tensor(p)) for p in ([1, 2], [3], [1, 2], [1, 2, 3], [3])]
    >>> prefix_groups(seqs, range(5))
    [[0, 2], [1, 4], [3]]
    """
    groups: dict[tuple[int, bytes], list[int]] = {}
    for i in indices:
        prompt = sequences[i].prompt_ids
        key = (prompt.numel(), prompt.to(torch.int64).numpy().tobytes())
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def group_tokens(sequences: Sequence[Any], group: Sequence[int]) -> int:
    """Tokens of a group segment: its prompt once plus every response."""
    prompt = sequences[group[0]].prompt_ids.numel()
    return prompt + sum(sequences[i].response_ids.numel() for i in group)


@dataclass(frozen=True)
class SharedPrefixRow:
    """One micro-batch row in the shared-prefix layout (CPU tensors)."""

    tokens_T: torch.Tensor
    """[T] packed token ids."""
    position_ids_T: torch.Tensor
    """[T] positions: 0.. in each context, continuing from the context length in each response."""
    cu_seqlens: torch.Tensor
    """[groups + 1] int32 group segment offsets."""
    pieces: tuple[Piece, ...]
    """Attention pieces tiling the row (model/shared_prefix.py)."""
    response: ResponseIndex
    """Positions predicting response tokens and the label slots (row order)."""
    order: tuple[int, ...]
    """Batch indices of the responses in layout order (``seq_ids_T`` index into it)."""
    max_seqlen: int
    """Longest group segment."""


def shared_prefix_row(sequences: Sequence[Any], groups: Sequence[Sequence[int]]) -> SharedPrefixRow:
    """Lay out ``groups`` (lists of batch indices sharing one prompt) in one packed row."""
    tokens, positions, pieces, seg_lens = [], [], [], []
    first_S, start_S, lens_S = [], [], []
    row = 0
    for group in groups:
        prompt = sequences[group[0]].prompt_ids
        responses = [sequences[i].response_ids for i in group]
        if any(not torch.equal(sequences[i].prompt_ids, prompt) for i in group):
            raise ValueError(f"group {list(group)} mixes different prompts")
        num_p = prompt.numel()
        lens = [r.numel() for r in responses]
        tokens += [prompt, *responses]
        positions += [torch.arange(num_p), *(torch.arange(num_p, num_p + n) for n in lens)]
        pieces += group_pieces(row, num_p, lens)
        starts = itertools.accumulate([row + num_p, *lens[:-1]])
        start_S += list(starts)
        first_S += [row + num_p - 1] * len(group)
        lens_S += lens
        seg_lens.append(num_p + sum(lens))
        row += seg_lens[-1]
    cu = torch.tensor([0, *itertools.accumulate(seg_lens)], dtype=torch.int32)
    response = shared_prefix_response_positions(
        torch.tensor(first_S), torch.tensor(start_S), torch.tensor(lens_S)
    )
    return SharedPrefixRow(
        tokens_T=torch.cat(tokens),
        position_ids_T=torch.cat(positions),
        cu_seqlens=cu,
        pieces=tuple(pieces),
        response=response,
        order=tuple(i for group in groups for i in group),
        max_seqlen=max(seg_lens),
    )


__all__ = ["SharedPrefixRow", "group_tokens", "prefix_groups", "shared_prefix_row"]
