"""Split a packed micro-batch over context-parallel ranks, and put per-token values back
together (pure torch; no torch.distributed: trainer/cp_gather.py does the communication).

Context parallelism (CP) runs every sequence of a micro-batch on ``cp`` ranks at once; Transformer
Engine's attention exchanges keys and values between them. For the packed (THD) layout the split
is the one Megatron-Core and TE use (``get_thd_batch_on_this_cp_rank``,
``tex.thd_get_partitioned_indices``):

* each packed segment is padded at its end to a multiple of ``2 * cp`` tokens (times TP with
  sequence parallelism, whose rows are split over TP after the CP split);
* each padded segment is cut into ``2 * cp`` equal chunks and rank ``r`` keeps chunks ``r`` and
  ``2 * cp - 1 - r``: with a causal mask the late chunks cost more, and this pairing gives every
  rank the same attention work;
* ``PackedSeqParams`` then carries ``cu_seqlens_q`` (real lengths) and ``cu_seqlens_q_padded``
  (the padded offsets in the full row), both for the whole row, not for this rank's part; the
  padding sits after the real tokens of its segment, so no real token sees it.

The loss only needs the response tokens whose *predicting* position this rank holds: their
labels are taken from the full row before the split (the next token may live on another rank,
as in Megatron, which shifts labels before splitting). Every response token lands on exactly one
CP rank, so summing the per-rank losses and metrics over CP (and gradients, which Megatron's DDP
reduces over the data x context-parallel group) gives the unsplit micro-batch's values; the
seq_mean aggregations get the whole sequences' token counts (``seq_token_counts_S``).

Shape letters: S tokens of the unsplit row, W the padded full row (W / cp per rank), T response
tokens of the unsplit micro-batch, t those of this rank, n segments.

>>> cu_n1 = torch.tensor([0, 5, 8])  # two sequences, 5 and 3 tokens
>>> padded = padded_offsets(cu_n1, 4)
>>> padded.tolist()
[0, 8, 12]
>>> [cp_row_index(padded, 2, r).tolist() for r in (0, 1)]
[[0, 1, 6, 7, 8, 11], [2, 3, 4, 5, 9, 10]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from megatron_rpt.loss.logprobs import ResponseIndex
from megatron_rpt.trainer.batch import MicroBatch


def padded_offsets(cu_seqlens_n1: torch.Tensor, multiple: int) -> torch.Tensor:
    """``[n + 1]`` int64 offsets of the segments once each is padded to a multiple of ``multiple``."""
    lens_n = torch.diff(cu_seqlens_n1.long())
    padded_n = -(-lens_n // multiple) * multiple
    return torch.cat([padded_n.new_zeros(1), torch.cumsum(padded_n, 0)])


def cp_row_index(cu_padded_n1: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """``[W / cp]`` positions in the padded full row that rank ``cp_rank`` keeps, in its order.

    Per segment: chunk ``cp_rank`` then chunk ``2 * cp_size - 1 - cp_rank`` of ``2 * cp_size``
    (TE's ``thd_get_partitioned_indices``). Every segment length must be a multiple of
    ``2 * cp_size``.
    """
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} outside [0, {cp_size})")
    cu = cu_padded_n1.long()
    lens_n = torch.diff(cu)
    if (lens_n % (2 * cp_size)).any():
        raise ValueError(f"segment lengths {lens_n.tolist()} are not multiples of 2 x CP")
    parts = []
    for start, length in zip(cu[:-1].tolist(), lens_n.tolist(), strict=True):
        chunk = length // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            parts.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def padded_width(mb: MicroBatch, cp_size: int, seq_multiple: int, width_multiple: int) -> int:
    """Tokens of ``mb``'s full row after ``split_micro_batch``'s padding (before the split)."""
    width = int(padded_offsets(mb.cu_seqlens, seq_multiple)[-1])
    return _round_up(width, math.lcm(seq_multiple, cp_size * width_multiple))


def split_micro_batch(
    mb: MicroBatch,
    cp_size: int,
    cp_rank: int,
    *,
    seq_multiple: int,
    width_multiple: int = 1,
    min_width: int = 0,
) -> MicroBatch:
    """This CP rank's part of a packed micro-batch (see the module docstring).

    Args:
        mb: an unsplit packed micro-batch (one row, ``cu_seqlens`` set, not shared-prefix).
        seq_multiple: each segment is padded to a multiple of this (``2 * cp``, times TP with
            sequence parallelism).
        width_multiple: this rank's row length is padded to a multiple of this (FP8 GEMMs,
            sequence parallelism), by one extra zero-loss segment at the end of the full row.
        min_width: the full padded row has at least this many tokens (one shape for every
            micro-batch of a step: a value of ``padded_width`` of another micro-batch).
    """
    if not mb.packed or mb.shared_prefix or mb.tokens.shape[0] != 1:
        raise ValueError("context-parallel split needs a packed (THD) micro-batch of one row")
    if seq_multiple % (2 * cp_size):
        raise ValueError(f"seq_multiple={seq_multiple} is not a multiple of 2 x CP={2 * cp_size}")
    cu_n1 = mb.cu_seqlens.long()
    lens_n = torch.diff(cu_n1)
    cu_pad_n1 = padded_offsets(cu_n1, seq_multiple)
    width = max(padded_width(mb, cp_size, seq_multiple, width_multiple), min_width)
    if width % math.lcm(seq_multiple, cp_size * width_multiple):
        raise ValueError(f"min_width={min_width} is not a valid padded width")
    extra = width - int(cu_pad_n1[-1])
    if extra:  # a segment of its own: real tokens (token 0) that no response position reads
        lens_n = torch.cat([lens_n, lens_n.new_tensor([extra])])
        cu_pad_n1 = torch.cat([cu_pad_n1, cu_pad_n1.new_tensor([width])])
    tokens_W, positions_W, to_padded_S = _padded_row(mb, cu_pad_n1)
    rows = cp_row_index(cu_pad_n1, cp_size, cp_rank)
    local_W = torch.full((width,), -1, dtype=torch.long)
    local_W[rows] = torch.arange(rows.numel())
    local_T = local_W[to_padded_S[mb.response.positions_T]]
    index_t = torch.nonzero(local_T >= 0).reshape(-1)
    fields = _response_fields(mb, index_t, local_T, to_padded_S)
    cu_real_n1 = torch.cat([lens_n.new_zeros(1), torch.cumsum(lens_n, 0)])
    return MicroBatch(
        tokens=tokens_W[rows].unsqueeze(0),
        position_ids=positions_W[rows].unsqueeze(0),
        cu_seqlens=cu_real_n1.to(torch.int32),
        cu_seqlens_padded=cu_pad_n1.to(torch.int32),
        max_seqlen=int(torch.diff(cu_pad_n1).max()),
        seq_indices=mb.seq_indices,
        num_tokens=mb.num_tokens,
        seq_token_counts_S=_seq_token_counts(mb),
        **fields,
    )


def _padded_row(
    mb: MicroBatch, cu_pad_n1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens ``[W]`` and positions ``[W]`` of the padded full row, and ``[S]`` where each token
    of the unsplit row sits in it (padding: token 0, positions counting on in the segment)."""
    cu_n1 = mb.cu_seqlens.long()
    n = cu_n1.numel() - 1
    shift_S = torch.repeat_interleave(cu_pad_n1[:n] - cu_n1[:n], torch.diff(cu_n1))
    to_padded_S = torch.arange(int(cu_n1[-1])) + shift_S
    tokens_W = torch.zeros(int(cu_pad_n1[-1]), dtype=mb.tokens.dtype)
    tokens_W[to_padded_S] = mb.tokens[0]
    positions_W = torch.cat([torch.arange(length) for length in torch.diff(cu_pad_n1).tolist()])
    positions_W[to_padded_S] = mb.position_ids[0]
    return tokens_W, positions_W, to_padded_S


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _seq_token_counts(mb: MicroBatch) -> torch.Tensor:
    """``[n]`` valid response tokens of each sequence of the unsplit micro-batch (fp32)."""
    seq_T = mb.response.seq_ids_T
    n = max(len(mb.seq_indices), int(seq_T.max()) + 1 if seq_T.numel() else 0)
    return torch.zeros(n).index_add(0, seq_T, mb.loss_mask_T.float())


def _response_fields(
    mb: MicroBatch, index_t: torch.Tensor, local_T: torch.Tensor, to_padded_S: torch.Tensor
) -> dict[str, object]:
    """The per-token fields of the response tokens ``index_t`` (a placeholder when empty)."""

    def pick(x_T: torch.Tensor | None) -> torch.Tensor | None:
        return None if x_T is None else x_T.index_select(0, index_t)

    if index_t.numel() == 0:
        # This rank predicts no response token of the micro-batch. It still runs the forward
        # and backward (TE's attention exchanges keys/values with the other CP ranks in both),
        # so it gets one masked-out token at row 0: zero loss, zero gradient.
        zero_1 = torch.zeros(1, dtype=torch.long)
        optional = {
            name: None if getattr(mb, name) is None else torch.zeros(1)
            for name in ("old_logprobs_T", "ref_logprobs_T")
        }
        return dict(
            response=ResponseIndex(zero_1, zero_1 + 1, zero_1),
            hidden_index_T=zero_1,
            labels_T=zero_1,
            advantages_T=torch.zeros(1),
            rollout_logprobs_T=torch.zeros(1),
            loss_mask_T=torch.zeros(1),
            cp_token_index_T=zero_1 - 1,
            **optional,
        )
    local_t = local_T.index_select(0, index_t)
    return dict(
        response=ResponseIndex(
            local_t,
            to_padded_S[mb.response.label_positions_T.index_select(0, index_t)],
            mb.response.seq_ids_T.index_select(0, index_t),
        ),
        hidden_index_T=local_t,  # one row: [S, 1] order == row order
        labels_T=pick(mb.labels_T),
        advantages_T=pick(mb.advantages_T),
        rollout_logprobs_T=pick(mb.rollout_logprobs_T),
        old_logprobs_T=pick(mb.old_logprobs_T),
        ref_logprobs_T=pick(mb.ref_logprobs_T),
        loss_mask_T=pick(mb.loss_mask_T),
        cp_token_index_T=index_t,
    )


def batch_token_index(
    cp_token_index_t: torch.Tensor,
    seq_ids_t: torch.Tensor,
    seq_token_counts_S: torch.Tensor,
    seq_indices: Sequence[int],
    seq_offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where this rank's response tokens of one split micro-batch sit in the whole batch.

    The unsplit micro-batch lists its response tokens sequence by sequence (``seq_indices``
    order, ``seq_token_counts_S`` each); ``seq_offsets[i]`` is where sequence i of the batch
    starts in the batch's flat order. Returns ``(index_k, keep_t)``: the flat positions of the
    ``k`` real tokens and the mask of them among the ``t`` (placeholders dropped).

    >>> batch_token_index(torch.tensor([0, 3, -1]), torch.tensor([0, 1, 0]),
    ...                   torch.tensor([2, 2]), (5, 1), torch.tensor([0, 4, 7, 9, 12, 20]))
    (tensor([20,  5]), tensor([ True,  True, False]))
    """
    keep_t = cp_token_index_t >= 0
    counts_S = seq_token_counts_S.long()
    seq_k = seq_ids_t[keep_t]
    within_k = cp_token_index_t[keep_t] - (torch.cumsum(counts_S, 0) - counts_S)[seq_k]
    seqs_S = torch.tensor(list(seq_indices), dtype=torch.long)
    return seq_offsets.long()[seqs_S[seq_k]] + within_k, keep_t


def merge_cp_values(
    indices: Sequence[torch.Tensor], values: Sequence[torch.Tensor], total: int
) -> torch.Tensor:
    """The inverse of the split for per-token values: ``[..., total]`` from every CP rank's part.

    ``indices[r]`` ``[t_r]`` are where rank r's values ``values[r]`` ``[..., t_r]`` go; negative
    indices (placeholders) are skipped. An index covered twice raises ValueError; positions no
    rank covers stay 0.

    >>> merge_cp_values([torch.tensor([0, 3]), torch.tensor([2, -1, 1])],
    ...                 [torch.tensor([1.0, 4.0]), torch.tensor([3.0, 9.0, 2.0])], 4)
    tensor([1., 2., 3., 4.])
    """
    if not values:
        raise ValueError("merge_cp_values needs at least one rank's values")
    lead = values[0].shape[:-1]
    out = values[0].new_zeros(*lead, total)
    seen = torch.zeros(total, dtype=torch.long, device=out.device)
    for index_t, value in zip(indices, values, strict=True):
        real_t = index_t >= 0
        index_t = index_t[real_t]
        out[..., index_t] = value[..., real_t]
        seen.index_add_(0, index_t, torch.ones_like(index_t))
    if (seen > 1).any():
        raise ValueError(
            f"context-parallel parts overlap at token(s) {torch.nonzero(seen > 1).flatten()[:8].tolist()}"
        )
    return out


__all__ = [
    "batch_token_index",
    "cp_row_index",
    "merge_cp_values",
    "padded_offsets",
    "padded_width",
    "split_micro_batch",
]
