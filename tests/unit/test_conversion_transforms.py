"""Pure transforms: QKV interleave, gated-MLP fuse, vocabulary padding, TP sharding."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rpt.conversion.mappings import find_mapping, hf_names, mapping_table
from megatron_rpt.conversion.tp_sharding import tp_shard, tp_unshard
from megatron_rpt.conversion.transforms import (
    TRANSFORMS,
    ConversionContext,
    merge_gated_mlp,
    merge_qkv,
    pad_vocab,
    split_gated_mlp,
    split_qkv,
    unpad_vocab,
)
from megatron_rpt.model.arch import arch_from_dict
from megatron_rpt.testing.tiny_models import tiny_config_dict


@settings(max_examples=30, deadline=None)
@given(
    kv=st.integers(1, 4),
    per_group=st.integers(1, 4),
    head_dim=st.integers(1, 5),
    cols=st.sampled_from([(), (3,)]),
)
def test_qkv_round_trip_and_layout(kv, per_group, head_dim, cols):
    heads = kv * per_group
    q = torch.randn(heads * head_dim, *cols)
    k = torch.randn(kv * head_dim, *cols)
    v = torch.randn(kv * head_dim, *cols)
    qkv = merge_qkv(q, k, v, heads, kv, head_dim)
    assert qkv.shape == ((heads + 2 * kv) * head_dim, *cols)
    # Megatron's layout: group g holds its per_group query heads, then k_g, then v_g.
    grouped = qkv.reshape(kv, per_group + 2, head_dim, *cols)
    for g in range(kv):
        assert torch.equal(
            grouped[g, :per_group].reshape(-1, *cols),
            q[g * per_group * head_dim : (g + 1) * per_group * head_dim],
        )
        assert torch.equal(grouped[g, per_group], k[g * head_dim : (g + 1) * head_dim])
        assert torch.equal(grouped[g, per_group + 1], v[g * head_dim : (g + 1) * head_dim])
    for a, b in zip(split_qkv(qkv, heads, kv, head_dim), (q, k, v), strict=True):
        assert torch.equal(a, b) and a.is_contiguous()


def test_gated_mlp_and_vocab_round_trip():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fc1 = merge_gated_mlp(gate, up)
    assert torch.equal(fc1[:6], gate) and torch.equal(fc1[6:], up)
    assert all(torch.equal(a, b) for a, b in zip(split_gated_mlp(fc1), (gate, up), strict=True))
    emb = torch.randn(5, 3)
    padded = pad_vocab(emb, 8)
    assert padded.shape == (8, 3) and torch.equal(padded[5:], torch.zeros(3, 3))
    assert torch.equal(unpad_vocab(padded, 5), emb)
    assert pad_vocab(emb, 5) is emb


def test_tied_output_layer_is_imported_but_never_exported():
    ctx = ConversionContext(
        num_heads=2, num_kv_heads=1, head_dim=2, vocab_size=5, padded_vocab_size=8
    )
    tied = TRANSFORMS["tied_vocab"]
    assert tied.to_hf(torch.randn(8, 3), ctx) == ()
    assert tied.to_megatron([torch.randn(5, 3)], ctx).shape == (8, 3)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("dim", [0, 1])
def test_tp_shard_round_trip(stride, tp, dim):
    full = torch.randn(16, 8)
    shards = [tp_shard(full, dim, stride, r, tp) for r in range(tp)]
    assert all(s.shape[dim] == full.shape[dim] // tp for s in shards)
    assert torch.equal(tp_unshard(shards, dim, stride), full)


def test_stride2_shard_holds_gate_and_up_blocks():
    gate, up = torch.arange(4.0)[:, None], 10 + torch.arange(4.0)[:, None]
    shard1 = tp_shard(merge_gated_mlp(gate, up), 0, 2, tp_rank=1, tp_size=2)
    assert shard1.flatten().tolist() == [2.0, 3.0, 12.0, 13.0]  # [gate_1; up_1]


def test_local_and_te_norm_names_map_to_the_same_hf_tensor():
    table = mapping_table(arch_from_dict(tiny_config_dict("qwen3")))
    pairs = [
        (
            "decoder.layers.3.input_layernorm.weight",
            "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight",
        ),
        (
            "decoder.layers.3.pre_mlp_layernorm.weight",
            "decoder.layers.3.mlp.linear_fc1.layer_norm_weight",
        ),
    ]
    for local, te in pairs:
        assert hf_names(*find_mapping(table, local)) == hf_names(*find_mapping(table, te))
    with pytest.raises(KeyError):
        find_mapping(table, "decoder.layers.0.mlp.router.weight")
