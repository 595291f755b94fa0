"""Batch planning and tensorization: DP partition, token-budget micro-batches, equal counts,
packed (THD) and padded layouts, global denominators, input validation."""

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rpt.errors import DataError
from megatron_rpt.trainer.batch import (
    RolloutBatch,
    TrainSequence,
    make_micro_batch,
    partition_dp,
    plan_batch,
    plan_micro_batches,
)


def _batch(shapes, advantages=None, **optional):
    seqs = []
    for i, (p, r) in enumerate(shapes):
        seqs.append(
            TrainSequence(
                prompt_ids=torch.arange(100 * i, 100 * i + p),
                response_ids=torch.arange(100 * i + 50, 100 * i + 50 + r),
                rollout_logprobs=-torch.arange(1, r + 1, dtype=torch.float32) / 10 - i,
                advantage=(advantages or [float(i + 1)] * len(shapes))[i],
                **{k: torch.full((r,), v) for k, v in optional.items()},
            )
        )
    return RolloutBatch(seqs)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(2, 40), min_size=1, max_size=30),
    dp=st.integers(1, 4),
    budget=st.integers(2, 64),
    layout=st.sampled_from(["packed", "padded"]),
)
def test_plan_covers_every_sequence_once_within_budget(lengths, dp, budget, layout):
    batch = _batch([(1, n - 1) for n in lengths])
    plan = plan_batch(batch, dp, budget, layout)
    seen = sorted(i for rank in plan.micro_batches for mb in rank for i in mb)
    assert seen == list(range(len(lengths)))
    assert len({len(rank) for rank in plan.micro_batches}) == 1  # equal counts on every DP rank
    for rank in plan.micro_batches:
        for mb in rank:
            cost = (
                sum(lengths[i] for i in mb)
                if layout == "packed"
                else len(mb) * max((lengths[i] for i in mb), default=0)
            )
            assert cost <= budget or len(mb) == 1  # only an oversized sequence breaks the budget
    assert plan.global_num_tokens == sum(n - 1 for n in lengths)
    assert plan.global_num_seqs == len(lengths)


def test_partition_balances_tokens_deterministically():
    counts = [50, 10, 40, 30, 20, 5, 5]
    parts = partition_dp(counts, 3)
    loads = [sum(counts[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= 10
    assert parts == partition_dp(counts, 3)
    assert sorted(i for p in parts for i in p) == list(range(7))


def test_ranks_without_data_get_padding_micro_batches():
    batch = _batch([(3, 4)])
    plan = plan_batch(batch, 4, 100, "packed", multiple_of=2)
    assert plan.num_micro_batches == 2  # rounded up to a multiple of the pipeline size
    assert plan.micro_batches[0] == [[0], []]
    assert all(rank == [[], []] for rank in plan.micro_batches[1:])
    pad = make_micro_batch(batch, [], "packed")
    assert pad.is_padding and pad.loss_mask_T.sum() == 0 and pad.num_tokens == 0
    assert pad.tokens.shape == (1, 2) and pad.cu_seqlens.tolist() == [0, 2]


def test_oversized_sequence_gets_its_own_micro_batch(caplog):
    with caplog.at_level(logging.WARNING):
        assert plan_micro_batches([0, 1, 2], [30, 4, 4], 10, "packed") == [[0], [1, 2]]
    assert "more than train.max_tokens_per_microbatch=10" in caplog.text


def test_packed_micro_batch_tensors():
    batch = _batch([(3, 2), (1, 4), (2, 1)])
    mb = make_micro_batch(batch, [0, 1, 2], "packed")
    assert mb.tokens.shape == (1, 13)
    assert mb.cu_seqlens.tolist() == [0, 5, 10, 13] and mb.cu_seqlens.dtype == torch.int32
    assert mb.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2]
    assert mb.max_seqlen == 5 and mb.num_tokens == 13
    # Each position predicts the next token: the labels are exactly the response tokens.
    expected = torch.cat([s.response_ids for s in batch.sequences])
    assert torch.equal(mb.labels_T, expected)
    assert torch.equal(mb.tokens[0, mb.response.positions_T + 1], expected)
    assert torch.equal(mb.hidden_index_T, mb.response.positions_T)
    assert mb.advantages_T.tolist() == [1.0] * 2 + [2.0] * 4 + [3.0]
    assert torch.equal(
        mb.rollout_logprobs_T, torch.cat([s.rollout_logprobs for s in batch.sequences])
    )
    assert mb.response.seq_ids_T.tolist() == [0, 0, 1, 1, 1, 1, 2]
    assert mb.old_logprobs_T is None and mb.ref_logprobs_T is None


def test_padded_micro_batch_tensors_and_hidden_index():
    batch = _batch([(3, 2), (1, 4)], ref_logprobs=-2.0)
    mb = make_micro_batch(batch, [1, 0], "padded")
    assert mb.tokens.shape == (2, 5) and mb.cu_seqlens is None
    assert mb.position_ids.tolist() == [list(range(5))] * 2
    assert (
        mb.tokens[1].tolist()
        == batch.sequences[0].prompt_ids.tolist() + batch.sequences[0].response_ids.tolist()
    )
    assert torch.equal(
        mb.labels_T, torch.cat([batch.sequences[1].response_ids, batch.sequences[0].response_ids])
    )
    # Megatron's hidden states are [S, B, H]: row s * B + b of the flattened tensor.
    hidden_SBH = torch.arange(10).reshape(5, 2, 1)  # value = s * 2 + b
    rows = hidden_SBH.reshape(-1, 1)[mb.hidden_index_T, 0]
    b_T = mb.response.positions_T // 5
    s_T = mb.response.positions_T % 5
    assert torch.equal(rows, s_T * 2 + b_T)
    assert mb.ref_logprobs_T.tolist() == [-2.0] * 6


def test_micro_batch_to_device_keeps_everything():
    batch = _batch([(2, 2)])
    mb = make_micro_batch(batch, [0], "packed").to("cpu")
    assert mb.seq_indices == (0,) and mb.response.positions_T.tolist() == [1, 2]


def test_padding_micro_batch_carries_optional_fields():
    batch = _batch([(2, 2)], old_logprobs=-1.0, ref_logprobs=-1.5)
    pad = make_micro_batch(batch, [], "padded")
    assert pad.old_logprobs_T is not None and pad.ref_logprobs_T is not None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt_ids=[], response_ids=[1], rollout_logprobs=[0.0]), "needs >= 1 prompt"),
        (dict(prompt_ids=[1], response_ids=[], rollout_logprobs=[]), "needs >= 1 prompt"),
        (
            dict(prompt_ids=[1], response_ids=[2, 3], rollout_logprobs=[0.0]),
            "rollout_logprobs has 1",
        ),
        (
            dict(prompt_ids=[1], response_ids=[2], rollout_logprobs=[0.0], ref_logprobs=[0.0, 1.0]),
            "ref_logprobs has 2",
        ),
    ],
)
def test_bad_sequences_are_data_errors(kwargs, message):
    with pytest.raises(DataError, match=message):
        TrainSequence(advantage=1.0, **kwargs)


def test_batch_rejects_partial_optional_fields_and_empty():
    a = TrainSequence([1], [2], [0.0], 1.0, old_logprobs=[0.0])
    b = TrainSequence([1], [2], [0.0], 1.0)
    with pytest.raises(DataError, match="old_logprobs is set for some"):
        RolloutBatch([a, b])
    with pytest.raises(DataError, match="no sequences"):
        RolloutBatch([])
