"""The context-parallel split of packed micro-batches (pure): the load-balanced chunk layout,
and the split and its inverse round-tripping exactly on ragged sequences."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rpt.trainer.batch import RolloutBatch, TrainSequence, make_micro_batch
from megatron_rpt.trainer.context_parallel import (
    batch_token_index,
    cp_row_index,
    merge_cp_values,
    padded_offsets,
    padded_width,
    split_micro_batch,
)


def _batch(shapes, *, optional=True):
    seqs = []
    for i, (p, r) in enumerate(shapes):
        extra = {}
        if optional:
            extra = dict(old_logprobs=-torch.rand(r) - i, ref_logprobs=-torch.rand(r) - 2 * i)
        seqs.append(
            TrainSequence(
                prompt_ids=torch.arange(1000 * i + 1, 1000 * i + 1 + p),
                response_ids=torch.arange(1000 * i + 500, 1000 * i + 500 + r),
                rollout_logprobs=-torch.arange(1, r + 1, dtype=torch.float32) / 10 - i,
                advantage=float(i) - 1.5,
                **extra,
            )
        )
    return RolloutBatch(seqs)


def _split_all(mb, cp, **kw):
    return [split_micro_batch(mb, cp, r, **kw) for r in range(cp)]


def _full_row(parts, cp):
    """The padded full row of tokens and positions, put back from every rank's rows."""
    cu_pad = parts[0].cu_seqlens_padded
    width = int(cu_pad[-1])
    tokens_W = torch.full((width,), -7, dtype=torch.long)
    positions_W = torch.full((width,), -7, dtype=torch.long)
    for r, part in enumerate(parts):
        rows = cp_row_index(cu_pad, cp, r)
        assert part.tokens.shape == (1, rows.numel())
        tokens_W[rows] = part.tokens[0]
        positions_W[rows] = part.position_ids[0]
    return tokens_W, positions_W


def test_chunk_layout_is_tes_load_balanced_pairing():
    # one 16-token sequence at CP=2: 4 chunks of 4; rank 0 keeps chunks 0 and 3, rank 1 1 and 2
    cu = torch.tensor([0, 16])
    assert cp_row_index(cu, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert cp_row_index(cu, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    # CP=3 over two segments: each rank's rows cover the whole padded row exactly once
    cu = padded_offsets(torch.tensor([0, 7, 20]), 6)
    assert cu.tolist() == [0, 12, 30]
    rows = torch.cat([cp_row_index(cu, 3, r) for r in range(3)])
    assert sorted(rows.tolist()) == list(range(30))
    with pytest.raises(ValueError, match="multiples of 2 x CP"):
        cp_row_index(torch.tensor([0, 6]), 2, 0)


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=5),
    cp=st.sampled_from([2, 3, 4]),
    tp=st.sampled_from([1, 2]),
    align=st.sampled_from([1, 16]),
)
def test_split_and_inverse_round_trip_exactly(shapes, cp, tp, align):
    batch = _batch(shapes)
    mb = make_micro_batch(batch, list(range(len(shapes))), "packed")
    parts = _split_all(mb, cp, seq_multiple=2 * cp * tp, width_multiple=align)
    width = padded_width(mb, cp, 2 * cp * tp, align)
    for part in parts:
        assert part.tokens.shape[1] * cp == width and part.tokens.shape[1] % align == 0
        assert torch.equal(part.cu_seqlens_padded, parts[0].cu_seqlens_padded)
        assert torch.equal(part.cu_seqlens, parts[0].cu_seqlens)
        assert part.max_seqlen == int(torch.diff(part.cu_seqlens_padded.long()).max())
        assert torch.equal(part.seq_token_counts_S, torch.tensor([float(r) for _, r in shapes]))
    cu_pad = parts[0].cu_seqlens_padded.long()
    assert (torch.diff(cu_pad) % (2 * cp * tp) == 0).all()
    # real lengths: the sequences, then (when the row needed it) the alignment segment
    real_n = torch.diff(parts[0].cu_seqlens.long())
    assert real_n[: len(shapes)].tolist() == [p + r for p, r in shapes]
    # tokens and positions: the padded row minus its padding is the unsplit row
    tokens_W, positions_W = _full_row(parts, cp)
    keep = torch.cat(
        [torch.arange(int(s), int(s) + int(n)) for s, n in zip(cu_pad[:-1], real_n, strict=True)]
    )
    n_real = int(mb.cu_seqlens[-1])
    assert torch.equal(tokens_W[keep][:n_real], mb.tokens[0])
    assert torch.equal(positions_W[keep][:n_real], mb.position_ids[0])
    # each rank's response tokens: predicted by a row it holds, labelled by the next token
    for r, part in enumerate(parts):
        rows = cp_row_index(cu_pad, cp, r)
        real = part.cp_token_index_T >= 0
        held = rows[part.hidden_index_T[real]]
        assert torch.equal(tokens_W[held + 1], part.labels_T[real])
        assert torch.equal(part.response.label_positions_T[real], held + 1)
    # per-token values: merged over the ranks, exactly the unsplit micro-batch's
    index = [p.cp_token_index_T for p in parts]
    T = mb.labels_T.numel()
    for name in ("labels_T", "advantages_T", "rollout_logprobs_T", "old_logprobs_T",
                 "ref_logprobs_T", "loss_mask_T"):
        merged = merge_cp_values(index, [getattr(p, name) for p in parts], T)
        assert torch.equal(merged, getattr(mb, name)), name
    merged_seq = merge_cp_values(index, [p.response.seq_ids_T for p in parts], T)
    assert torch.equal(merged_seq, mb.response.seq_ids_T)
    # every token is held by exactly one rank
    counts = torch.zeros(T, dtype=torch.long)
    for idx in index:
        counts.index_add_(0, idx[idx >= 0], torch.ones_like(idx[idx >= 0]))
    assert (counts == 1).all()


def test_rank_without_response_tokens_gets_a_masked_placeholder():
    # The padding micro-batch (2 tokens, one masked response position) at CP=2: position 0
    # is in chunk 0 (rank 0); rank 1 predicts nothing and gets a zero-weight token.
    mb = make_micro_batch(_batch([(3, 2)]), [], "packed")
    rank0, rank1 = _split_all(mb, 2, seq_multiple=4)
    assert rank0.cp_token_index_T.tolist() == [0] and rank0.loss_mask_T.tolist() == [0.0]
    assert rank1.cp_token_index_T.tolist() == [-1] and rank1.loss_mask_T.tolist() == [0.0]
    assert rank1.old_logprobs_T is not None and rank1.labels_T.numel() == 1
    # a short response at the start of a long sequence lands on one rank only
    mb = make_micro_batch(_batch([(1, 1)]), [0], "packed")
    parts = _split_all(mb, 4, seq_multiple=8)
    assert sorted(int(p.cp_token_index_T[0]) for p in parts) == [-1, -1, -1, 0]


def test_common_width_for_fixed_shape_schedules():
    batch = _batch([(5, 9), (2, 3), (1, 1)])
    mbs = [make_micro_batch(batch, [0, 1], "packed"), make_micro_batch(batch, [2], "packed")]
    width = max(padded_width(mb, 2, 4, 16) for mb in mbs)
    widths = {split_micro_batch(mb, 2, r, seq_multiple=4, width_multiple=16,
                                min_width=width).tokens.shape[1]
              for mb in mbs for r in range(2)}
    assert widths == {width // 2}
    with pytest.raises(ValueError, match="not a valid padded width"):
        split_micro_batch(mbs[1], 2, 0, seq_multiple=4, width_multiple=16, min_width=width + 4)


def test_refuses_layouts_it_cannot_split():
    batch = _batch([(3, 2), (3, 4)])
    with pytest.raises(ValueError, match="packed"):
        split_micro_batch(make_micro_batch(batch, [0, 1], "padded"), 2, 0, seq_multiple=4)
    with pytest.raises(ValueError, match="packed"):
        split_micro_batch(make_micro_batch(batch, [0, 1], "shared_prefix"), 2, 0, seq_multiple=4)
    with pytest.raises(ValueError, match="multiple of 2 x CP"):
        split_micro_batch(make_micro_batch(batch, [0, 1], "packed"), 2, 0, seq_multiple=2)


def test_merge_refuses_overlapping_parts():
    with pytest.raises(ValueError, match="overlap at token"):
        merge_cp_values([torch.tensor([0, 1]), torch.tensor([1])],
                        [torch.ones(2), torch.ones(1)], 3)


def test_batch_token_index_places_tokens_in_the_flat_batch():
    batch = _batch([(2, 3), (1, 2), (4, 1)])
    lengths = torch.tensor([s.response_ids.numel() for s in batch.sequences])
    offsets = torch.cumsum(lengths, 0) - lengths
    mb = make_micro_batch(batch, [2, 0], "packed")  # sequences out of batch order
    flat = torch.full((int(lengths.sum()),), -1.0)
    for part in _split_all(mb, 2, seq_multiple=4):
        index, keep = batch_token_index(part.cp_token_index_T, part.response.seq_ids_T,
                                        part.seq_token_counts_S, part.seq_indices, offsets)
        flat[index] = part.labels_T[keep].float()
    want = torch.cat([batch.sequences[i].response_ids.float() for i in range(3)])
    want[3:5] = -1.0  # sequence 1 is not in this micro-batch
    assert torch.equal(flat, want)


def _built(spec="te", cp=2):
    from types import SimpleNamespace

    return SimpleNamespace(config=SimpleNamespace(context_parallel_size=cp), spec=spec)


def test_trainer_refuses_what_cp_does_not_compose_with():
    from types import SimpleNamespace

    from megatron_rpt.errors import ConfigError
    from megatron_rpt.trainer.step import _check_context_parallel

    groups = SimpleNamespace(cp_size=2)
    _check_context_parallel(_built(), "packed", groups)
    with pytest.raises(ConfigError, match="cannot split train.micro_batch_layout=shared_prefix"):
        _check_context_parallel(_built(), "shared_prefix", groups)
    with pytest.raises(ConfigError, match="needs train.micro_batch_layout=packed, not 'padded'"):
        _check_context_parallel(_built(), "padded", groups)
    with pytest.raises(ConfigError, match=r"context_parallel_size=2 needs .*model.spec=te"):
        _check_context_parallel(_built(spec="local"), "packed", groups)
    with pytest.raises(ConfigError, match="initialised with CP=1"):
        _check_context_parallel(_built(), "packed", SimpleNamespace(cp_size=1))


def test_cp_is_refused_on_cpu_naming_the_setting():
    from megatron_rpt import capabilities
    from megatron_rpt.config import RPTConfig
    from megatron_rpt.errors import ConfigError
    from megatron_rpt.model.arch import arch_from_dict
    from megatron_rpt.model.build import build_transformer_config
    from megatron_rpt.model.config import ModelConfig, ParallelConfig
    from megatron_rpt.preflight import check_context_parallel
    from megatron_rpt.testing.tiny_models import tiny_config_dict

    if capabilities.have_te():
        pytest.skip("machine has Transformer Engine: CP is allowed")
    cfg = RPTConfig()
    cfg.parallel.context_parallel_size = 2
    with pytest.raises(ConfigError, match="parallel.context_parallel_size=2 needs Transformer"):
        check_context_parallel(cfg)
    arch = arch_from_dict(tiny_config_dict("qwen3"))
    with pytest.raises(ConfigError, match="parallel.context_parallel_size=2 needs Transformer"):
        build_transformer_config(arch, ModelConfig(), ParallelConfig(context_parallel_size=2))
