"""Megatron GPTModel built from HF checkpoints reproduces HF logits (fp32, TP=1); the vocabulary
padding never reaches logits."""

import pytest
import torch

from megatron_rpt.model.build import VocabSizes
from megatron_rpt.model.config import ModelConfig, ParallelConfig
from megatron_rpt.model.logits import mask_padded_vocab, true_vocab_logits
from megatron_rpt.testing.distributed import run_distributed
from megatron_rpt.testing.tiny_models import KINDS, VOCAB, hf_logits, save_tiny_model

TOL = 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_hf_fp32(kind, tmp_path, groups):
    from megatron_rpt.checkpoint.loading import build_pretrained
    from megatron_rpt.model.logits import forward_logits

    hf_dir = save_tiny_model(kind, tmp_path)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    built = build_pretrained(
        ModelConfig(hf_path=str(hf_dir), dtype="fp32"), ParallelConfig(), groups
    )
    assert built.vocab == VocabSizes(true=VOCAB, padded=256) and built.spec == "local"
    logits = forward_logits(built, tokens, groups)
    assert logits.shape == (2, 24, VOCAB)  # padding columns sliced away
    assert (logits - hf_logits(hf_dir, tokens)).abs().max().item() <= TOL


def test_bf16_model_runs_through_float16module(tmp_path, groups):
    from megatron.core.transformer.module import Float16Module

    from megatron_rpt.checkpoint.loading import build_pretrained
    from megatron_rpt.model.logits import forward_logits

    hf_dir = save_tiny_model("qwen2", tmp_path)
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    built = build_pretrained(
        ModelConfig(hf_path=str(hf_dir), dtype="bf16"), ParallelConfig(), groups
    )
    assert isinstance(built.chunks[0], Float16Module)
    assert all(p.dtype == torch.bfloat16 for p in built.chunks[0].parameters())
    logits = forward_logits(built, tokens, groups)
    assert logits.dtype == torch.float32
    assert (logits - hf_logits(hf_dir, tokens)).abs().max().item() < 0.1  # bf16 rounding only


def test_llama3_rope_scaling_matches_hf(tmp_path, groups):
    from megatron_rpt.checkpoint.loading import build_pretrained
    from megatron_rpt.model.logits import forward_logits

    rope = {
        "rope_type": "llama3",
        "rope_theta": 5e5,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    hf_dir = save_tiny_model("llama", tmp_path, config_overrides={"rope_parameters": rope})
    tokens = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(3))
    built = build_pretrained(
        ModelConfig(hf_path=str(hf_dir), dtype="fp32"), ParallelConfig(), groups
    )
    logits = forward_logits(built, tokens, groups)
    assert (logits - hf_logits(hf_dir, tokens)).abs().max().item() <= TOL


def test_mask_padded_vocab_per_tp_rank():
    vocab = VocabSizes(true=250, padded=256)
    logits = torch.randn(2, 3, 128)
    assert mask_padded_vocab(logits, vocab, tp_rank=0, tp_size=2) is logits  # no padding here
    masked = mask_padded_vocab(logits, vocab, tp_rank=1, tp_size=2)
    assert torch.isinf(masked[..., 122:]).all() and torch.equal(
        masked[..., :122], logits[..., :122]
    )
    assert not torch.isinf(logits).any()  # input untouched
    full = torch.randn(2, 3, 256)
    assert true_vocab_logits(full, vocab).shape == (2, 3, 250)
    probs = torch.softmax(mask_padded_vocab(full, vocab, 0, 1), dim=-1)
    assert probs[..., 250:].sum().item() == 0.0


def _smollm2_logits_diff(rank, world_size):
    from megatron_rpt.assets import smollm2_dir
    from megatron_rpt.checkpoint.loading import build_pretrained
    from megatron_rpt.distributed import initialize_model_parallel, seed_model_parallel
    from megatron_rpt.model.logits import forward_logits

    groups = initialize_model_parallel(1, 1)
    seed_model_parallel(0, groups)
    tokens = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(4))
    built = build_pretrained(
        ModelConfig(hf_path="embedded:smollm2", dtype="fp32"), ParallelConfig(), groups
    )
    logits = forward_logits(built, tokens, groups)
    del built
    return (logits - hf_logits(smollm2_dir(), tokens)).abs().max().item(), list(logits.shape)


def test_smollm2_logits_match_hf():
    # A separate process: two copies of a 135M model would otherwise stay in pytest's heap.
    diff, shape = run_distributed(_smollm2_logits_diff, 1, timeout=240)[0]
    assert shape == [1, 12, 49152]
    assert diff <= TOL
