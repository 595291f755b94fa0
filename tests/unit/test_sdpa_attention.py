"""SDPA core attention: causal, GQA, decode alignment and the attention_mask contract."""

import math

import pytest
import torch
from megatron.core.transformer import TransformerConfig

from megatron_rpt.model.sdpa_attention import SDPACoreAttention


def _reference(q_SBND, k_KBGD, v_KBGD, visible_BNSK):
    heads, groups = q_SBND.shape[2], k_KBGD.shape[2]
    k = k_KBGD.repeat_interleave(heads // groups, dim=2)
    v = v_KBGD.repeat_interleave(heads // groups, dim=2)
    scores = torch.einsum("sbnd,kbnd->bnsk", q_SBND, k) / math.sqrt(q_SBND.shape[-1])
    scores = scores.masked_fill(~visible_BNSK, float("-inf"))
    out = torch.einsum("bnsk,kbnd->sbnd", scores.softmax(-1), v)
    return out.reshape(out.shape[0], out.shape[1], -1)


@pytest.fixture
def attn():
    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=16,
        num_attention_heads=4,
        num_query_groups=2,
        use_cpu_initialization=True,
    )
    return SDPACoreAttention(cfg, layer_number=1, attn_mask_type=None, attention_type="self").eval()


def _qkv(s, k, generator_seed=0):
    g = torch.Generator().manual_seed(generator_seed)
    return (
        torch.randn(s, 2, 4, 4, generator=g),
        torch.randn(k, 2, 2, 4, generator=g),
        torch.randn(k, 2, 2, 4, generator=g),
    )


def test_causal_gqa_matches_reference(attn):
    q, k, v = _qkv(6, 6)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    expected = _reference(q, k, v, causal.expand(2, 4, 6, 6))
    torch.testing.assert_close(attn(q, k, v, None), expected, rtol=1e-5, atol=1e-6)


def test_decode_step_aligns_last_query_with_last_key(attn):
    q, k, v = _qkv(2, 5)  # two new queries after three cached keys
    visible = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    expected = _reference(q, k, v, visible.expand(2, 4, 2, 5))
    torch.testing.assert_close(attn(q, k, v, None), expected, rtol=1e-5, atol=1e-6)


def test_mask_only_removes_positions_and_never_gives_nan(attn):
    q, k, v = _qkv(4, 4)
    pad = torch.zeros(2, 1, 1, 4, dtype=torch.bool)
    pad[0, 0, 0, 0] = True  # sequence 0: key 0 is (left) padding
    out = attn(q, k, v, pad)
    assert not torch.isnan(out).any()
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    visible = (causal & ~pad).expand(2, 4, 4, 4).clone()
    visible[0, :, 0, 0] = True  # the fully masked row attends to itself
    torch.testing.assert_close(out, _reference(q, k, v, visible), rtol=1e-5, atol=1e-6)
    # A mask that already contains causality (Megatron's convention, True = masked) changes nothing.
    full_mask = ~causal.expand(2, 1, 4, 4)
    torch.testing.assert_close(attn(q, k, v, full_mask), attn(q, k, v, None))


def test_unsupported_inputs_raise(attn):
    q, k, v = _qkv(2, 2)
    with pytest.raises(NotImplementedError, match="packed sequences"):
        attn(q, k, v, None, packed_seq_params=object())
