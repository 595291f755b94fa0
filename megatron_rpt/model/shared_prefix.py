"""Shared-prefix attention: the G responses of one context laid out once, not G times.

RPT trains on groups of one long context and G sampled responses. Laid out as G separate
sequences, the context's forward and backward pass runs G times. Here a group is one packed
segment (trainer/prefix_layout.py builds it)::

    tokens     [ ctx (P)     | r_1 (R_1)      | r_2 (R_2)      | ... | r_G (R_G)      ]
    positions    0 .. P-1      P .. P+R_1-1     P .. P+R_2-1           P .. P+R_G-1

and attention restricts every response to the context and (causally) to itself. Each
response then sees exactly the keys, values and positions it sees in its own sequence
``[ctx; r_i]``, so the loss and every gradient equal the separate layout's (autograd sums
the context's gradient contributions from the G responses instead of the optimizer summing
G copies); only the floating-point summation order differs.

**Pieces.** The packed row (any mix of groups and ordinary sequences) is partitioned into
contiguous *pieces* ``Piece(start, end, prefix_start, prefix_end)``. A piece's queries are
rows ``[start, end)``; its keys/values are the rows ``[prefix_start, prefix_end)`` followed by
its own rows; the mask is causal aligned to the **bottom right**: query ``i`` of a piece with
``L`` queries and ``K = prefix + L`` keys sees keys ``j <= i + K - L``, i.e. the whole prefix and
its own rows causally. A group becomes ``[ctx; r_1]`` (one ordinary causal piece, no prefix)
followed by one piece per further response with the context as prefix; an ordinary sequence
is one piece without prefix. This is exactly what a variable-length flash-attention call
computes with ``cu_seqlens_q`` over the pieces, ``cu_seqlens_kv`` over a gathered KV buffer
(``kv_index``) and the bottom-right causal mask (Transformer Engine's
``padding_causal_bottom_right``, model/specs.py); torch SDPA does it piece by piece with
``torch.nn.attention.bias.causal_lower_right`` (model/sdpa_attention.py). No ``T x T`` mask
is ever built. The context's K/V rows are read once per response (G - 1 extra reads of
``[P, heads_kv, head_dim]`` per layer); projections and MLP run once per token.

**Rotary embeddings.** Megatron-Core 0.16.1 rotates token ``t`` by ``freqs[t]`` in the sbhd
format and restarts positions per ``cu_seqlens`` segment in the thd format
(``rope_utils._apply_rotary_pos_emb_thd``); neither gives response ``i >= 2`` the positions
``P, P+1, ...``. ``SharedPrefixParams`` therefore says ``qkv_format='sbhd'`` (Megatron's own
hybrid context parallelism passes sbhd ``PackedSeqParams`` too), so Megatron's attention
applies ``rotary_pos_emb[t]`` to row ``t`` (fused TE RoPE or not), and ``RPTGPTModel``
replaces the rotary table by its rows at the explicit ``position_ids``
(``rotary_rows_at``). Row ``p`` of that table is the same tensor row Megatron uses for
position ``p`` of a separate sequence, so the rotations are bit-identical.
``rotary_per_token`` records that the model did this; the attention modules refuse the
params otherwise (a stock ``GPTModel`` would rotate response ``i >= 2`` by its row index).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from megatron.core.packed_seq_params import PackedSeqParams


class Piece(NamedTuple):
    """Query rows ``[start, end)`` attending to rows ``[prefix_start, prefix_end)`` + themselves.

    ``prefix_start == prefix_end`` (the default) means no prefix: ordinary causal attention.
    """

    start: int
    end: int
    prefix_start: int = 0
    prefix_end: int = 0

    @property
    def num_queries(self) -> int:
        """Rows of the piece (its queries)."""
        return self.end - self.start

    @property
    def num_keys(self) -> int:
        """Prefix rows + own rows."""
        return self.prefix_end - self.prefix_start + self.end - self.start

    @property
    def has_prefix(self) -> bool:
        """Whether the piece attends to a prefix before its own rows."""
        return self.prefix_end > self.prefix_start


def group_pieces(start: int, prompt_len: int, response_lens: Sequence[int]) -> list[Piece]:
    """Pieces of one group segment ``[ctx; r_1; ...; r_G]`` beginning at row ``start``.

    The first response rides with the context in one causal piece (the context rows are
    queries once, and K/V of the context are duplicated only G - 1 times).

    >>> group_pieces(10, 4, [2, 3, 1])
    [Piece(start=10, end=16, prefix_start=0, prefix_end=0), Piece(start=16, end=19, prefix_start=10, prefix_end=14), Piece(start=19, end=20, prefix_start=10, prefix_end=14)]
    """
    if prompt_len < 1 or not response_lens or min(response_lens) < 1:
        raise ValueError(
            f"a group needs a context and >= 1 non-empty response, got P={prompt_len}, "
            f"R={list(response_lens)}"
        )
    ctx_end = start + prompt_len
    pieces = [Piece(start, ctx_end + response_lens[0])]
    row = pieces[0].end
    for length in response_lens[1:]:
        pieces.append(Piece(row, row + length, start, ctx_end))
        row += length
    return pieces


def check_pieces(pieces: Sequence[Piece], total: int) -> None:
    """Pieces must tile rows ``[0, total)`` in order; a prefix must lie before its piece."""
    row = 0
    for piece in pieces:
        ok = (
            piece.start == row
            and piece.end > piece.start
            and 0 <= piece.prefix_start <= piece.prefix_end <= piece.start
        )
        if not ok:
            raise ValueError(
                f"shared-prefix piece {tuple(piece)} is invalid at row {row}: pieces must tile "
                f"[0, {total}) in order, each prefix before its piece"
            )
        row = piece.end
    if row != total:
        raise ValueError(f"shared-prefix pieces cover {row} rows, the packed row has {total}")


@dataclass
class SharedPrefixParams(PackedSeqParams):
    """``PackedSeqParams`` for the shared-prefix layout (see the module docstring).

    ``qkv_format`` is ``'sbhd'`` (query ``[T, 1, heads, dim]``; RoPE by row, with the per-token
    table from ``RPTGPTModel``). ``cu_seqlens_q`` ``[n+1]`` (int32) delimits the n pieces in
    the row, ``cu_seqlens_kv`` ``[n+1]`` their keys in the gathered KV buffer ``kv_index``
    ``[K]`` (rows of the packed tensors); ``max_seqlen_kv - 1`` is the largest position.
    """

    pieces: tuple[Piece, ...] = ()
    """Host copy of the pieces (the SDPA path loops over them without a device sync)."""
    kv_index: torch.Tensor | None = None
    """[K] long: packed rows forming each piece's keys/values, piece after piece."""
    rotary_per_token: bool = False
    """Set by ``RPTGPTModel`` once it has made RoPE follow ``position_ids``."""

    @classmethod
    def from_pieces(
        cls, pieces: Sequence[Piece], device: torch.device | str = "cpu"
    ) -> SharedPrefixParams:
        """Params (tensors on ``device``) for pieces tiling a packed row."""
        pieces = tuple(Piece(*p) for p in pieces)
        check_pieces(pieces, pieces[-1].end if pieces else 0)
        q_lens = [p.num_queries for p in pieces]
        kv_lens = [p.num_keys for p in pieces]
        kv_index = torch.cat(
            [
                torch.cat(
                    [torch.arange(p.prefix_start, p.prefix_end), torch.arange(p.start, p.end)]
                )
                for p in pieces
            ]
        )
        return cls(
            qkv_format="sbhd",
            cu_seqlens_q=_offsets(q_lens, device),
            cu_seqlens_kv=_offsets(kv_lens, device),
            max_seqlen_q=max(q_lens),
            max_seqlen_kv=max(kv_lens),
            pieces=pieces,
            kv_index=kv_index.to(device),
        )


def _offsets(lengths: list[int], device: torch.device | str) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def check_attention_call(
    params: SharedPrefixParams,
    query: torch.Tensor,
    attention_mask: torch.Tensor | None,
    attention_bias: torch.Tensor | None,
) -> None:
    """What every shared-prefix core attention requires of its inputs (raises ValueError)."""
    if not params.rotary_per_token:
        raise ValueError(
            "SharedPrefixParams reached the attention without per-token RoPE: run the model as "
            "RPTGPTModel (megatron_rpt.model.rpt_gpt), which rotates each row by its position id"
        )
    if attention_mask is not None or attention_bias is not None:
        raise ValueError("shared-prefix attention takes no attention_mask / attention_bias")
    if query.dim() != 4 or query.shape[1] != 1:
        raise ValueError(
            f"shared-prefix attention expects sbhd query [T, 1, heads, dim], got {tuple(query.shape)}"
        )
    check_pieces(params.pieces, query.shape[0])


def rotary_rows_at(table_M11D: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """``[T, 1, 1, d]`` rotary rows of the packed tokens from a ``[M, 1, 1, d]`` table.

    ``table_M11D[p]`` is Megatron's rotary embedding of position ``p``; ``position_ids`` is the
    ``[1, T]`` packed row of positions. Raises if a position is not in the table.

    >>> table = torch.arange(4.0).reshape(4, 1, 1, 1)
    >>> rotary_rows_at(table, torch.tensor([[0, 1, 2, 1, 2, 3]])).flatten().tolist()
    [0.0, 1.0, 2.0, 1.0, 2.0, 3.0]
    """
    if position_ids.dim() != 2 or position_ids.shape[0] != 1:
        raise ValueError(
            f"position_ids must be one packed row [1, T], got {tuple(position_ids.shape)}"
        )
    return table_M11D.index_select(0, position_ids.reshape(-1).to(table_M11D.device))


def dense_reference_mask(pieces: Sequence[Piece], total: int) -> torch.Tensor:
    """``[T, T]`` boolean "may attend" matrix of the pieces (tests and docs only: O(T^2)).

    >>> dense_reference_mask(group_pieces(0, 2, [1, 1]), 4).int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]]
    """
    check_pieces(pieces, total)
    visible = torch.zeros(total, total, dtype=torch.bool)
    for p in pieces:
        own = torch.ones(p.num_queries, p.num_queries, dtype=torch.bool).tril()
        visible[p.start : p.end, p.start : p.end] = own
        visible[p.start : p.end, p.prefix_start : p.prefix_end] = True
    return visible


__all__ = [
    "Piece",
    "SharedPrefixParams",
    "check_attention_call",
    "check_pieces",
    "dense_reference_mask",
    "group_pieces",
    "rotary_rows_at",
]
