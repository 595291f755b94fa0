"""Rollouts -> per-DP-rank micro-batches of tensors (pure torch; no torch.distributed).

Every rank holds the whole global ``RolloutBatch`` (token ids and a few floats per token: small
next to the model) and computes the same plan from it, so the DP partition, the micro-batch
split and the global loss denominators agree on every rank without any communication.

Shape letters: B rows of a micro-batch, S its (padded) length, T response tokens of the
micro-batch, n sequences in it.

**DP partition** (``partition_dp``): longest-processing-time-first. Sequences are taken in
order of decreasing total length (prompt + response; ties by index) and each goes to the DP
rank with the fewest tokens so far (ties: the lowest rank). Forward/backward cost is roughly
linear in tokens at RPT lengths, so this balances step time; it is deterministic.

**Micro-batches** (``plan_micro_batches``): first-fit decreasing under the token budget
``max_tokens_per_microbatch``. The cost of a micro-batch is its token count when packed, and
rows x longest row when padded. A sequence longer than the budget gets a micro-batch of its
own (logged as a warning): splitting it would need context parallelism.

**Equal micro-batch counts.** Every DP rank runs the same number of micro-batches; ranks with
fewer get *padding* micro-batches (2 tokens, loss mask 0, zero gradient). Why: Megatron's
schedules need at least one micro-batch (a DP rank can receive no sequence when the batch has
fewer sequences than DP ranks); the interleaved pipeline schedule needs a multiple of the PP
size; and collectives issued per micro-batch or per forward across DP ranks (the
DistributedOptimizer's overlapped parameter all-gather hooks, MoE expert-parallel all-to-all,
which spans DP ranks) must be issued the same number of times on every rank or they deadlock.

**Layouts** (``make_micro_batch``):

* shared_prefix (the 'auto' choice on the local spec): like packed, but the responses that share a prompt (a GRPO group)
  are laid out behind ONE copy of it, ``[ctx; r_1; ...; r_G]``, with per-piece attention and
  positions continuing from the context length in every response (trainer/prefix_layout.py,
  model/shared_prefix.py). The DP partition and the micro-batches take whole groups (a group
  is never split) and count the tokens of this layout. Loss and gradients equal the packed
  layout's (tests/distributed/test_shared_prefix.py).
* packed: one ``[1, T_total]`` row; ``cu_seqlens`` gives the segments (Megatron's
  ``PackedSeqParams``, qkv_format thd); position ids restart at 0 in each sequence.
* padded: ``[B, S]`` right-padded with token 0; positions ``0..S-1``. Causal attention means
  real tokens never see the padding to their right, so no attention mask is needed.

**Global denominators**: ``global_num_tokens`` (response tokens of the whole global batch, all
DP ranks) and ``global_num_seqs`` are the same number on every rank and in every micro-batch,
so summing the micro-batch losses over micro-batches and DP ranks gives the full-batch loss
(loss/policy_loss.py).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_rpt.errors import DataError
from megatron_rpt.loss.logprobs import ResponseIndex, response_positions
from megatron_rpt.model.shared_prefix import Piece
from megatron_rpt.trainer.prefix_layout import group_tokens, prefix_groups, shared_prefix_row

logger = logging.getLogger(__name__)

LAYOUTS = ("shared_prefix", "packed", "padded")


@dataclass
class TrainSequence:
    """One sampled response to one context, ready to train on.

    Token ids are model vocabulary ids; ``rollout_logprobs`` are the rollout engine's
    ``log_softmax(logits / temperature)`` of the sampled response tokens (``Completion``).
    """

    prompt_ids: torch.Tensor
    """[P] context/prompt token ids (P >= 1)."""
    response_ids: torch.Tensor
    """[R] sampled response token ids (R >= 1)."""
    rollout_logprobs: torch.Tensor
    """[R] the rollout engine's log-probs of the response tokens."""
    advantage: float
    """The response's advantage (e.g. GRPO), applied to all its tokens."""
    group_id: int = 0
    """Index of the context the response belongs to (for metrics)."""
    ref_logprobs: torch.Tensor | None = None
    """[R] reference-policy log-probs (needed when loss.kl_coef > 0)."""
    old_logprobs: torch.Tensor | None = None
    """[R] log-probs of the policy the PPO ratio is taken against; None = exactly on-policy."""
    reward: float | None = None
    """The response's reward (logging only)."""

    def __post_init__(self) -> None:
        self.prompt_ids = torch.as_tensor(self.prompt_ids, dtype=torch.long).reshape(-1)
        self.response_ids = torch.as_tensor(self.response_ids, dtype=torch.long).reshape(-1)
        if self.prompt_ids.numel() < 1 or self.response_ids.numel() < 1:
            raise DataError(
                f"TrainSequence (group {self.group_id}) needs >= 1 prompt and >= 1 response "
                f"token, got {self.prompt_ids.numel()} and {self.response_ids.numel()}"
            )
        for name in ("rollout_logprobs", "ref_logprobs", "old_logprobs"):
            value = getattr(self, name)
            if value is None:
                continue
            value = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
            if value.numel() != self.response_ids.numel():
                raise DataError(
                    f"TrainSequence.{name} has {value.numel()} entries for "
                    f"{self.response_ids.numel()} response tokens (group {self.group_id})"
                )
            setattr(self, name, value)
        self.advantage = float(self.advantage)

    @property
    def num_tokens(self) -> int:
        """Prompt + response tokens."""
        return self.prompt_ids.numel() + self.response_ids.numel()


@dataclass
class RolloutBatch:
    """The global batch of one optimizer step (identical on every rank)."""

    sequences: list[TrainSequence]

    def __post_init__(self) -> None:
        if not self.sequences:
            raise DataError("RolloutBatch has no sequences")
        for name in ("ref_logprobs", "old_logprobs"):
            have = [getattr(s, name) is not None for s in self.sequences]
            if any(have) and not all(have):
                raise DataError(f"RolloutBatch: {name} is set for some sequences but not all")

    @property
    def global_num_tokens(self) -> int:
        """Response tokens of the whole batch (the token_mean denominator)."""
        return sum(s.response_ids.numel() for s in self.sequences)

    @property
    def global_num_seqs(self) -> int:
        """Sequences of the whole batch (the seq_mean denominator)."""
        return len(self.sequences)

    def has(self, name: str) -> bool:
        """Whether the optional per-token field ``name`` (ref_logprobs/old_logprobs) is set."""
        return getattr(self.sequences[0], name) is not None


# ----------------------------------------------------------------------------- planning


def partition_dp(token_counts: Sequence[int], dp_size: int) -> list[list[int]]:
    """Sequence indices of each DP rank, balanced by tokens (see the module docstring).

    >>> partition_dp([5, 1, 4, 4], 2)
    [[0, 1], [2, 3]]
    """
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    order = sorted(range(len(token_counts)), key=lambda i: (-token_counts[i], i))
    loads = [(0, rank) for rank in range(dp_size)]  # heap of (tokens, rank)
    parts: list[list[int]] = [[] for _ in range(dp_size)]
    for i in order:
        tokens, rank = heapq.heappop(loads)
        parts[rank].append(i)
        heapq.heappush(loads, (tokens + token_counts[i], rank))
    return parts


def _cost(lengths: Sequence[int], layout: str) -> int:
    return len(lengths) * max(lengths, default=0) if layout == "padded" else sum(lengths)


def plan_micro_batches(
    indices: Sequence[int], token_counts: Sequence[int], max_tokens: int, layout: str
) -> list[list[int]]:
    """Split ``indices`` into micro-batches under ``max_tokens`` (first-fit decreasing).

    The indices are micro-batching units: sequences, or shared-prefix groups whose
    ``token_counts`` are their segment lengths.

    >>> plan_micro_batches([0, 1, 2, 3], [6, 3, 5, 2], 8, "packed")
    [[0, 3], [2, 1]]
    >>> plan_micro_batches([0, 1, 2, 3], [6, 3, 5, 2], 8, "padded")  # rows x longest row
    [[0], [2], [1, 3]]
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    order = sorted(indices, key=lambda i: (-token_counts[i], i))
    bins: list[list[int]] = []
    for i in order:
        if token_counts[i] > max_tokens:
            logger.warning(
                "sequence/group %d has %d tokens, more than train.max_tokens_per_microbatch=%d: "
                "it gets a micro-batch of its own",
                i,
                token_counts[i],
                max_tokens,
            )
            bins.append([i])
            continue
        for b in bins:
            if _cost([token_counts[j] for j in (*b, i)], layout) <= max_tokens:
                b.append(i)
                break
        else:
            bins.append([i])
    return bins


@dataclass(frozen=True)
class BatchPlan:
    """The DP partition and micro-batch split of a global batch (the same on every rank)."""

    micro_batches: list[list[list[int]]]
    """Per DP rank, its micro-batches as lists of sequence indices ([] = padding)."""
    global_num_tokens: int
    global_num_seqs: int
    layout_tokens: int = 0
    """Tokens the forward/backward passes process over all DP ranks (padding excluded): prompt +
    response per sequence, or for shared_prefix each group's prompt once plus its responses."""

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per DP rank (equal on all ranks)."""
        return len(self.micro_batches[0])


def plan_batch(
    batch: RolloutBatch,
    dp_size: int,
    max_tokens: int,
    layout: str,
    *,
    multiple_of: int = 1,
) -> BatchPlan:
    """Partition over DP, split into micro-batches, pad every rank to the same count.

    ``multiple_of``: the count is also rounded up to a multiple of this (the PP size for the
    interleaved pipeline schedule). With ``shared_prefix`` the units partitioned and packed are
    the prompt groups (never split); micro-batches list their sequences group by group.
    """
    seqs = batch.sequences
    if layout == "shared_prefix":
        units = prefix_groups(seqs, range(len(seqs)))
        counts = [group_tokens(seqs, unit) for unit in units]
    else:
        units = [[i] for i in range(len(seqs))]
        counts = [s.num_tokens for s in seqs]
    per_rank = [
        [
            [i for u in mb for i in units[u]]
            for mb in plan_micro_batches(part, counts, max_tokens, layout)
        ]
        for part in partition_dp(counts, dp_size)
    ]
    num = max(1, max(len(mbs) for mbs in per_rank))
    num = -(-num // multiple_of) * multiple_of
    padded = [mbs + [[] for _ in range(num - len(mbs))] for mbs in per_rank]
    return BatchPlan(padded, batch.global_num_tokens, batch.global_num_seqs, sum(counts))


# ----------------------------------------------------------------------------- tensors


@dataclass
class MicroBatch:
    """Tensors of one micro-batch (CPU; ``to(device)`` before the forward)."""

    tokens: torch.Tensor
    """[B, S] input ids (packed: B = 1)."""
    position_ids: torch.Tensor
    """[B, S] positions (packed: restarting at 0 in each sequence)."""
    cu_seqlens: torch.Tensor | None
    """[n + 1] int32 segment offsets (packed layout only)."""
    max_seqlen: int
    """Longest sequence of the micro-batch."""
    response: ResponseIndex
    """Positions predicting response tokens, in the row-major [B * S] flattening."""
    hidden_index_T: torch.Tensor
    """[T] rows of the last stage's hidden states flattened in Megatron's [S, B] order."""
    labels_T: torch.Tensor
    """[T] the response tokens (what the positions predict)."""
    advantages_T: torch.Tensor
    """[T] per-token advantages (the sequence's advantage on each of its tokens)."""
    rollout_logprobs_T: torch.Tensor
    """[T] rollout engine log-probs."""
    old_logprobs_T: torch.Tensor | None
    ref_logprobs_T: torch.Tensor | None
    loss_mask_T: torch.Tensor
    """[T] 1 for real response tokens, 0 in padding micro-batches."""
    seq_indices: tuple[int, ...]
    """Indices into ``RolloutBatch.sequences`` of the n sequences, in the order of their
    tokens in ``labels_T`` (``response.seq_ids_T`` indexes this; empty: padding)."""
    num_tokens: int
    """Real tokens of the row(s): prompt + response per sequence (shared_prefix: each group's
    prompt once)."""
    pieces: tuple[Piece, ...] | None = None
    """Shared-prefix attention pieces tiling the packed row (shared_prefix layout only)."""
    cu_seqlens_padded: torch.Tensor | None = None
    """[n + 1] int32 offsets of the segments in the full row after each was padded for context
    parallelism (CP > 1 only, trainer/context_parallel.py; ``cu_seqlens`` then counts the real
    tokens of each segment and ``tokens`` holds this CP rank's part of the row)."""
    seq_token_counts_S: torch.Tensor | None = None
    """[n] valid response tokens of each whole sequence, when this rank holds only part of
    them (CP > 1): the seq_mean_token_mean denominator. None: counted from ``loss_mask_T``."""
    cp_token_index_T: torch.Tensor | None = None
    """[T] (CP > 1) where each of this rank's response tokens sits in the unsplit micro-batch's
    token order; -1 marks a zero-weight placeholder (a rank that got no response token)."""

    @property
    def is_padding(self) -> bool:
        """A zero-weight micro-batch that only keeps ranks in step."""
        return not self.seq_indices

    @property
    def packed(self) -> bool:
        """One packed row (packed THD or shared_prefix)."""
        return self.cu_seqlens is not None

    @property
    def shared_prefix(self) -> bool:
        """Shared-prefix layout (attention by ``pieces``)."""
        return self.pieces is not None

    def to(self, device: torch.device | str) -> MicroBatch:
        """A copy with every tensor on ``device``."""
        moved = {
            name: (value.to(device) if isinstance(value, torch.Tensor) else value)
            for name, value in self.__dict__.items()
        }
        moved["response"] = ResponseIndex(
            *(
                t.to(device)
                for t in (
                    self.response.positions_T,
                    self.response.label_positions_T,
                    self.response.seq_ids_T,
                )
            )
        )
        return MicroBatch(**moved)


def make_micro_batch(batch: RolloutBatch, indices: Sequence[int], layout: str) -> MicroBatch:
    """Tensorize the sequences ``indices`` of ``batch`` (``[]``: a padding micro-batch).

    With ``shared_prefix`` the sequences are regrouped by prompt (``seq_indices`` gives the
    resulting order).
    """
    if not indices:
        return _padding_micro_batch(batch, layout)
    if layout == "shared_prefix":
        return _shared_prefix_micro_batch(batch, indices)
    seqs = [batch.sequences[i] for i in indices]
    rows = [torch.cat([s.prompt_ids, s.response_ids]) for s in seqs]
    lens_n = torch.tensor([r.numel() for r in rows])
    prompt_n = torch.tensor([s.prompt_ids.numel() for s in seqs])
    if layout == "packed":
        tokens_BS = torch.cat(rows).unsqueeze(0)
        position_ids_BS = torch.cat([torch.arange(n) for n in lens_n.tolist()]).unsqueeze(0)
        cu_n1 = torch.zeros(len(rows) + 1, dtype=torch.long)
        cu_n1[1:] = torch.cumsum(lens_n, 0)
        response = response_positions(cu_n1, prompt_n)
        hidden_index_T = response.positions_T  # B = 1: [S, 1] order == row order
        cu_seqlens = cu_n1.to(torch.int32)
    elif layout == "padded":
        rows_n, width = len(rows), int(lens_n.max())
        tokens_BS = torch.zeros(rows_n, width, dtype=torch.long)
        for r, row in enumerate(rows):
            tokens_BS[r, : row.numel()] = row
        position_ids_BS = torch.arange(width).expand(rows_n, width).contiguous()
        response = response_positions(torch.arange(rows_n + 1) * width, prompt_n, lens_n)
        row_T, col_T = response.positions_T // width, response.positions_T % width
        hidden_index_T = col_T * rows_n + row_T
        cu_seqlens = None
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return _micro_batch(
        seqs,
        indices,
        tokens=tokens_BS,
        position_ids=position_ids_BS,
        cu_seqlens=cu_seqlens,
        max_seqlen=int(lens_n.max()),
        response=response,
        hidden_index_T=hidden_index_T,
        num_tokens=int(lens_n.sum()),
    )


def _shared_prefix_micro_batch(batch: RolloutBatch, indices: Sequence[int]) -> MicroBatch:
    row = shared_prefix_row(batch.sequences, prefix_groups(batch.sequences, indices))
    return _micro_batch(
        [batch.sequences[i] for i in row.order],
        row.order,
        tokens=row.tokens_T.unsqueeze(0),
        position_ids=row.position_ids_T.unsqueeze(0),
        cu_seqlens=row.cu_seqlens,
        max_seqlen=row.max_seqlen,
        response=row.response,
        hidden_index_T=row.response.positions_T,  # one row: [S, 1] order == row order
        num_tokens=row.tokens_T.numel(),
        pieces=row.pieces,
    )


def _micro_batch(seqs: list[TrainSequence], indices: Sequence[int], **layout: Any) -> MicroBatch:
    """The per-token loss inputs of ``seqs`` (in order) around a laid-out row."""
    response: ResponseIndex = layout["response"]
    return MicroBatch(
        labels_T=layout["tokens"].reshape(-1)[response.label_positions_T],
        advantages_T=torch.cat([torch.full((s.response_ids.numel(),), s.advantage) for s in seqs]),
        rollout_logprobs_T=torch.cat([s.rollout_logprobs for s in seqs]),
        old_logprobs_T=_cat_optional(seqs, "old_logprobs"),
        ref_logprobs_T=_cat_optional(seqs, "ref_logprobs"),
        loss_mask_T=torch.ones(response.positions_T.numel()),
        seq_indices=tuple(indices),
        **layout,
    )


def _cat_optional(seqs: list[TrainSequence], name: str) -> torch.Tensor | None:
    values = [getattr(s, name) for s in seqs]
    return None if values[0] is None else torch.cat(values)


def _padding_micro_batch(batch: RolloutBatch, layout: str) -> MicroBatch:
    """Two tokens, one masked-out response token: a real forward/backward with zero gradient."""
    zeros_1 = torch.zeros(1)
    optional = {
        name: zeros_1 if batch.has(name) else None for name in ("old_logprobs", "ref_logprobs")
    }
    response = ResponseIndex(
        torch.zeros(1, dtype=torch.long),
        torch.ones(1, dtype=torch.long),
        torch.zeros(1, dtype=torch.long),
    )
    return MicroBatch(
        tokens=torch.zeros(1, 2, dtype=torch.long),
        position_ids=torch.arange(2).unsqueeze(0),
        cu_seqlens=torch.tensor([0, 2], dtype=torch.int32) if layout != "padded" else None,
        max_seqlen=2,
        response=response,
        hidden_index_T=torch.zeros(1, dtype=torch.long),
        labels_T=torch.zeros(1, dtype=torch.long),
        advantages_T=zeros_1,
        rollout_logprobs_T=zeros_1,
        old_logprobs_T=optional["old_logprobs"],
        ref_logprobs_T=optional["ref_logprobs"],
        loss_mask_T=zeros_1,
        seq_indices=(),
        num_tokens=0,
        pieces=(Piece(0, 2),) if layout == "shared_prefix" else None,
    )


def rank_micro_batches(
    batch: RolloutBatch, plan: BatchPlan, dp_rank: int, layout: str
) -> list[MicroBatch]:
    """This DP rank's micro-batches, in plan order."""
    return [make_micro_batch(batch, idx, layout) for idx in plan.micro_batches[dp_rank]]


def pad_to_common_shape(micro_batches: list[MicroBatch]) -> list[MicroBatch]:
    """Pad every micro-batch to the same ``[B, S]`` (for schedules that need fixed shapes).

    Packed: the row is extended by one extra segment of token 0 (its own causal segment, no
    loss). Padded: rows and columns of token 0 are appended. Response tokens, labels and loss
    inputs are unchanged; only positions into the larger tensors are recomputed.
    """
    rows = max(mb.tokens.shape[0] for mb in micro_batches)
    width = max(mb.tokens.shape[1] for mb in micro_batches)
    return [_pad_micro_batch(mb, rows, width) for mb in micro_batches]


def _pad_micro_batch(mb: MicroBatch, rows: int, width: int) -> MicroBatch:
    old_rows, old_width = mb.tokens.shape
    if (old_rows, old_width) == (rows, width):
        return mb
    tokens = torch.zeros(rows, width, dtype=mb.tokens.dtype)
    tokens[:old_rows, :old_width] = mb.tokens
    fields = dict(mb.__dict__)
    if mb.packed:
        assert rows == old_rows == 1, "packed micro-batches have one row"
        extra = width - old_width
        fields["position_ids"] = torch.cat([mb.position_ids, torch.arange(extra)[None]], dim=1)
        fields["cu_seqlens"] = torch.cat([mb.cu_seqlens, mb.cu_seqlens.new_tensor([width])])
        fields["max_seqlen"] = max(mb.max_seqlen, extra)
        if mb.shared_prefix:
            fields["pieces"] = (*mb.pieces, Piece(old_width, width))
    else:
        fields["position_ids"] = torch.arange(width).expand(rows, width).contiguous()
        row_T = mb.response.positions_T // old_width
        col_T = mb.response.positions_T % old_width
        positions_T = row_T * width + col_T
        fields["response"] = ResponseIndex(positions_T, positions_T + 1, mb.response.seq_ids_T)
        fields["hidden_index_T"] = col_T * rows + row_T
    fields["tokens"] = tokens
    return MicroBatch(**fields)


__all__ = [
    "BatchPlan",
    "MicroBatch",
    "RolloutBatch",
    "TrainSequence",
    "make_micro_batch",
    "pad_to_common_shape",
    "partition_dp",
    "plan_batch",
    "plan_micro_batches",
    "rank_micro_batches",
]
