"""Packed sequences (THD) on the local spec, and RPTGPTModel's hidden-state output.

Megatron 0.16.1 squeezes q/k/v to [T, heads, dim] for qkv_format thd and restarts RoPE per
cu_seqlens segment (rope_utils._apply_rotary_pos_emb_thd); SDPACoreAttention restricts
attention to each segment. So a packed row must give the same logits as each sequence alone.
"""

import math

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig

from megatron_rpt.model.config import ModelConfig, ParallelConfig
from megatron_rpt.model.sdpa_attention import SDPACoreAttention
from megatron_rpt.testing.tiny_models import VOCAB, save_tiny_model

TOL = 1e-5


def _packed(lengths):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max(lengths),
        max_seqlen_kv=max(lengths),
    )


def test_sdpa_packed_attention_stays_inside_segments():
    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=16,
        num_attention_heads=4,
        num_query_groups=2,
        use_cpu_initialization=True,
    )
    attn = SDPACoreAttention(cfg, layer_number=1, attn_mask_type=None, attention_type="self").eval()
    lengths = [3, 1, 5]
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(9, 4, 4, generator=g),
        torch.randn(9, 2, 4, generator=g),
        torch.randn(9, 2, 4, generator=g),
    )
    out = attn(q, k, v, None, packed_seq_params=_packed(lengths))
    assert out.shape == (9, 16)
    start = 0
    for n in lengths:
        qs, ks, vs = q[start : start + n], k[start : start + n], v[start : start + n]
        ks, vs = ks.repeat_interleave(2, dim=1), vs.repeat_interleave(2, dim=1)
        scores = torch.einsum("snd,knd->nsk", qs, ks) / math.sqrt(4)
        scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
        ref = torch.einsum("nsk,knd->snd", scores.softmax(-1), vs).reshape(n, 16)
        assert torch.allclose(out[start : start + n], ref, atol=1e-6)
        start += n
    with pytest.raises(ValueError, match="attention_mask must be None"):
        attn(q, k, v, torch.zeros(1, 1, 9, 9, dtype=torch.bool), packed_seq_params=_packed(lengths))
    with pytest.raises(ValueError, match="must rise from 0"):
        attn(q, k, v, None, packed_seq_params=_packed([3, 1, 4]))
    with pytest.raises(NotImplementedError, match="qkv_format='thd'"):
        attn(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd"))


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_packed_logits_equal_per_sequence_logits(kind, tmp_path, groups):
    from megatron_rpt.checkpoint.loading import build_pretrained

    hf_dir = save_tiny_model(kind, tmp_path)
    model = (
        build_pretrained(ModelConfig(hf_path=str(hf_dir), dtype="fp32"), ParallelConfig(), groups)
        .chunks[0]
        .eval()
    )
    lengths = [5, 9, 3, 1]
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(torch.cat(seqs)[None], positions, None, packed_seq_params=_packed(lengths))
        alone = torch.cat([model(s[None], torch.arange(len(s))[None], None) for s in seqs], dim=1)
        # Without the segments the later sequences would attend to earlier ones.
        unsegmented = model(torch.cat(seqs)[None], positions, None)
    assert (packed - alone).abs().max().item() <= TOL
    assert (unsegmented - alone).abs().max().item() > 1e-2


def test_rpt_gpt_model_returns_final_hidden_states(tmp_path, groups):
    from megatron_rpt.checkpoint.loading import build_pretrained
    from megatron_rpt.model.rpt_gpt import RPTGPTModel

    hf_dir = save_tiny_model("qwen2", tmp_path)
    cfg = ModelConfig(hf_path=str(hf_dir), dtype="fp32")
    logits_model = build_pretrained(cfg, ParallelConfig(), groups).chunks[0].eval()
    hidden_model = build_pretrained(cfg, ParallelConfig(), groups, output="hidden").chunks[0].eval()
    assert (
        isinstance(hidden_model, RPTGPTModel)
        and not hidden_model.share_embeddings_and_output_weights
    )
    tokens = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    positions = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        logits_BSV = logits_model(tokens, positions, None)
        hidden_SBH = hidden_model(tokens, positions, None)
        assert hidden_SBH.shape == (7, 2, 64)
        from_hidden = (hidden_SBH @ hidden_model.output_weight().t()).transpose(0, 1)
        assert (from_hidden - logits_BSV).abs().max().item() <= TOL
        hidden_model.output_hidden_states = False  # the switch gives Megatron's logits back
        assert torch.equal(hidden_model(tokens, positions, None), logits_BSV)
