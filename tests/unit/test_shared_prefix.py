"""Shared-prefix layout, single process: planning keeps groups whole; every response token is
predicted from the same (token, position) context as in its own sequence; the attention
module equals a dense-mask reference (forward and gradients); the model's hidden states equal
the per-sequence ones; refusals. The full training-step exactness (every gradient, TP/PP) is
tests/distributed/test_shared_prefix.py."""

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rpt.errors import ConfigError
from megatron_rpt.model.shared_prefix import (
    Piece,
    SharedPrefixParams,
    dense_reference_mask,
    group_pieces,
)
from megatron_rpt.testing.tiny_models import VOCAB, save_tiny_model
from megatron_rpt.trainer.batch import make_micro_batch, pad_to_common_shape, plan_batch
from megatron_rpt.trainer.prefix_layout import group_tokens, prefix_groups
from tests.helpers.attention import reference_attention
from tests.helpers.training import random_group_batch

TOL = 1e-5


def _group_batch(seed, **kw):
    return random_group_batch(VOCAB, seed=seed, **kw)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_groups=st.integers(1, 8),
    dp=st.integers(1, 3),
    budget=st.integers(2, 80),
)
def test_plan_keeps_every_group_whole_within_budget(seed, num_groups, dp, budget):
    batch = _group_batch(seed, num_groups=num_groups)
    seqs = batch.sequences
    groups = prefix_groups(seqs, range(len(seqs)))
    assert len(groups) == num_groups  # prompts are random: one group per context
    plan = plan_batch(batch, dp, budget, "shared_prefix")
    where = {}
    for rank, mbs in enumerate(plan.micro_batches):
        for m, mb in enumerate(mbs):
            for i in mb:
                assert i not in where
                where[i] = (rank, m)
            mb_groups = prefix_groups(seqs, mb)
            cost = sum(group_tokens(seqs, g) for g in mb_groups)
            assert cost <= budget or len(mb_groups) == 1  # only an oversized group breaks it
    assert sorted(where) == list(range(len(seqs)))
    for g in groups:
        assert len({where[i] for i in g}) == 1  # never split over micro-batches or DP ranks
    assert plan.layout_tokens == sum(group_tokens(seqs, g) for g in groups)
    assert plan.global_num_tokens == sum(s.response_ids.numel() for s in seqs)
    assert plan.global_num_seqs == len(seqs)


def _contexts(mb, seq_local):
    """Per response token of local sequence ``seq_local``: (sorted visible (position, token)
    keys of its predictor slot, the predictor's (position, token), the label)."""
    tokens, positions = mb.tokens[0], mb.position_ids[0]
    total = tokens.numel()
    pieces = mb.pieces if mb.shared_prefix else _segment_pieces(mb.cu_seqlens)
    visible = dense_reference_mask(pieces, total)
    sel = mb.response.seq_ids_T == seq_local
    out = []
    for slot, label in zip(mb.response.positions_T[sel], mb.labels_T[sel], strict=True):
        keys = sorted(
            (int(positions[k]), int(tokens[k])) for k in torch.nonzero(visible[slot])[:, 0]
        )
        out.append((keys, (int(positions[slot]), int(tokens[slot])), int(label)))
    return out


def _segment_pieces(cu):
    return [Piece(int(a), int(b)) for a, b in zip(cu[:-1], cu[1:], strict=True)]


@pytest.mark.parametrize("seed", range(6))
def test_every_response_token_sees_what_it_sees_in_its_own_sequence(seed):
    batch = _group_batch(seed, num_groups=3, group_sizes=(1, 5))
    indices = list(range(len(batch.sequences)))
    shared = make_micro_batch(batch, indices, "shared_prefix")
    separate = make_micro_batch(batch, indices, "packed")
    groups = prefix_groups(batch.sequences, indices)
    assert shared.num_tokens == sum(group_tokens(batch.sequences, g) for g in groups)
    assert shared.tokens.shape[1] == shared.num_tokens < separate.num_tokens
    assert sorted(shared.seq_indices) == indices
    for local, seq in enumerate(shared.seq_indices):
        # separate.seq_indices == indices, so the sequence's local index there is seq itself
        assert _contexts(shared, local) == _contexts(separate, seq)
        for name in ("advantages_T", "rollout_logprobs_T"):
            assert torch.equal(
                getattr(shared, name)[shared.response.seq_ids_T == local],
                getattr(separate, name)[separate.response.seq_ids_T == seq],
            )
    # The last context slot predicts the first token of every response of its group.
    first = shared.response.positions_T[
        torch.cat(
            [torch.tensor([True]), shared.response.seq_ids_T[1:] != shared.response.seq_ids_T[:-1]]
        )
    ]
    assert len(set(first.tolist())) == len(groups)


@pytest.mark.parametrize(
    "layout",
    [
        [(5, [3, 4, 1])],  # one group
        [(2, [1]), (6, [2, 2, 5, 3]), (1, [4, 1])],  # groups of 1 (= plain sequences) and more
    ],
)
def test_attention_module_matches_dense_mask_reference(layout):
    from megatron.core.transformer import TransformerConfig

    from megatron_rpt.model.sdpa_attention import SDPACoreAttention

    cfg = TransformerConfig(
        num_layers=1, hidden_size=16, num_attention_heads=4, num_query_groups=2,
        use_cpu_initialization=True,
    )  # fmt: skip
    attn = SDPACoreAttention(cfg, layer_number=1, attn_mask_type=None, attention_type="self").eval()
    pieces, row = [], 0
    for prompt, responses in layout:
        pieces += group_pieces(row, prompt, responses)
        row += prompt + sum(responses)
    params = SharedPrefixParams.from_pieces(pieces)
    params.rotary_per_token = True  # what RPTGPTModel does; RoPE is not part of this test
    g = torch.Generator().manual_seed(len(pieces))
    q = torch.randn(row, 4, 4, generator=g, requires_grad=True)
    k, v = (torch.randn(row, 2, 4, generator=g, requires_grad=True) for _ in range(2))
    out = attn(q[:, None], k[:, None], v[:, None], None, packed_seq_params=params)
    assert out.shape == (row, 1, 16)
    ref = reference_attention(q, k, v, dense_reference_mask(pieces, row))
    assert (out[:, 0] - ref).abs().max().item() <= 1e-6
    weights = torch.randn(row, 16, generator=g)
    grads = torch.autograd.grad((out[:, 0] * weights).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads, strict=True):
        assert (a - b).abs().max().item() <= 1e-5
    # Not trivially the packed layout: the whole group as one causal segment differs.
    whole = reference_attention(q, k, v, torch.ones(row, row, dtype=torch.bool).tril())
    assert (out[:, 0] - whole).abs().max().item() > 1e-2
    with pytest.raises(ValueError, match="without per-token RoPE"):
        params.rotary_per_token = False
        attn(q[:, None], k[:, None], v[:, None], None, packed_seq_params=params)


def test_params_and_pieces_are_validated():
    params = SharedPrefixParams.from_pieces(group_pieces(0, 3, [2, 4]))
    assert params.qkv_format == "sbhd"
    assert params.cu_seqlens_q.tolist() == [0, 5, 9] and params.cu_seqlens_kv.tolist() == [0, 5, 12]
    assert params.kv_index.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 8]
    assert (params.max_seqlen_q, params.max_seqlen_kv) == (5, 7)
    with pytest.raises(ValueError, match="pieces must tile"):
        SharedPrefixParams.from_pieces([Piece(0, 3), Piece(4, 5)])
    with pytest.raises(ValueError, match="pieces must tile"):
        SharedPrefixParams.from_pieces([Piece(0, 3), Piece(3, 5, 2, 4)])  # prefix overlaps
    with pytest.raises(ValueError, match="a group needs"):
        group_pieces(0, 0, [1])


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_model_hidden_states_equal_per_sequence_hidden_states(kind, tmp_path, groups):
    from megatron_rpt.checkpoint.loading import build_pretrained
    from megatron_rpt.model.config import ModelConfig, ParallelConfig
    from megatron_rpt.trainer.forward import packed_seq_params

    hf_dir = save_tiny_model(kind, tmp_path)
    cfg = ModelConfig(hf_path=str(hf_dir), dtype="fp32")
    model = build_pretrained(cfg, ParallelConfig(), groups, output="hidden").chunks[0].eval()
    batch = _group_batch(3, num_groups=2, group_sizes=(2, 4), prompt_lens=(20, 40))
    mb = make_micro_batch(batch, list(range(len(batch.sequences))), "shared_prefix")
    with torch.no_grad():
        shared_T1H = model(
            mb.tokens, mb.position_ids, None, packed_seq_params=packed_seq_params(mb)
        )
        for local, seq_index in enumerate(mb.seq_indices):
            seq = batch.sequences[seq_index]
            alone = torch.cat([seq.prompt_ids, seq.response_ids])[None]
            alone_S1H = model(alone, torch.arange(alone.shape[1])[None], None)
            # Response rows in the shared row, and the context rows of its group.
            sel = mb.response.seq_ids_T == local
            rows = mb.response.label_positions_T[sel]
            p = seq.prompt_ids.numel()
            got = shared_T1H[rows, 0]
            assert (got - alone_S1H[p:, 0]).abs().max().item() <= TOL
            ctx_end = int(mb.response.positions_T[sel][0]) + 1
            assert (shared_T1H[ctx_end - p : ctx_end, 0] - alone_S1H[:p, 0]).abs().max() <= TOL


def test_stock_gpt_model_is_refused(tmp_path, groups):
    """A GPTModel without RPTGPTModel's per-token RoPE would rotate responses by row index.
    Its rotary table (max_seqlen_kv rows) is shorter than the row whenever a group has two
    responses, so Megatron's RoPE fails first; the attention's own check is the backstop."""
    from megatron_rpt.checkpoint.loading import build_pretrained
    from megatron_rpt.model.config import ModelConfig, ParallelConfig
    from megatron_rpt.trainer.forward import packed_seq_params

    hf_dir = save_tiny_model("llama", tmp_path)
    cfg = ModelConfig(hf_path=str(hf_dir), dtype="fp32")
    model = build_pretrained(cfg, ParallelConfig(), groups, output="logits").chunks[0]
    batch = _group_batch(1, num_groups=1, group_sizes=(2, 2))
    mb = make_micro_batch(batch, [0, 1], "shared_prefix")
    with pytest.raises(RuntimeError, match="must match the size"):
        model(mb.tokens, mb.position_ids, None, packed_seq_params=packed_seq_params(mb))


def test_fixed_shape_padding_keeps_pieces_tiling_the_row():
    batch = _group_batch(5, num_groups=3)
    plan = plan_batch(batch, 1, 30, "shared_prefix")
    mbs = [make_micro_batch(batch, idx, "shared_prefix") for idx in plan.micro_batches[0]]
    mbs.append(make_micro_batch(batch, [], "shared_prefix"))  # a padding micro-batch
    padded = pad_to_common_shape(mbs)
    width = max(mb.tokens.shape[1] for mb in mbs)
    for before, after in zip(mbs, padded, strict=True):
        assert after.tokens.shape == (1, width)
        params = SharedPrefixParams.from_pieces(after.pieces)  # validates the tiling
        assert int(params.cu_seqlens_q[-1]) == width
        assert params.max_seqlen_kv == int(after.position_ids.max()) + 1  # the RoPE table size
        assert torch.equal(after.labels_T, before.labels_T)


def test_unsupported_model_settings_are_refused():
    from megatron_rpt.trainer.step import _check_shared_prefix

    def built(**overrides):
        cfg = dict(
            context_parallel_size=1,
            fused_single_qkv_rope=False,
            multi_latent_attention=False,
            window_size=None,
            sequence_parallel=False,
        )
        return SimpleNamespace(config=SimpleNamespace(**(cfg | overrides)), spec="local")

    _check_shared_prefix(built())
    for name, value in [("context_parallel_size", 2), ("window_size", (8, 0))]:
        with pytest.raises(ConfigError, match="micro_batch_layout=shared_prefix does not support"):
            _check_shared_prefix(built(**{name: value}))
