"""GPU checks of model building and conversion (skipped without a GPU; see conftest.py).

On a GPU machine the builder uses CUDA initialisation, the normal RNG tracker and no CPU
patches; with Transformer Engine it also picks the TE layer spec, whose parameter names differ
from the local spec's (fused layer-norm weights) but map to the same HF tensors.
"""

import pytest
import torch

from megatron_rpt.model.config import ModelConfig, ParallelConfig
from megatron_rpt.testing.tiny_models import VOCAB, hf_logits, save_tiny_model

pytestmark = pytest.mark.gpu


def _logits(spec, hf_dir, tokens, groups):
    from megatron_rpt.checkpoint.loading import build_pretrained
    from megatron_rpt.model.logits import forward_logits

    built = build_pretrained(
        ModelConfig(hf_path=str(hf_dir), dtype="fp32", spec=spec), ParallelConfig(), groups
    )
    return built, forward_logits(built, tokens.cuda(), groups).cpu()


@pytest.mark.parametrize("kind", ["llama_tied", "qwen2", "qwen3"])
def test_local_spec_on_gpu_matches_hf(kind, tmp_path, groups):
    torch.backends.cuda.matmul.allow_tf32 = False
    hf_dir = save_tiny_model(kind, tmp_path)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    built, logits = _logits("local", hf_dir, tokens, groups)
    assert next(built.chunks[0].parameters()).is_cuda
    assert (logits - hf_logits(hf_dir, tokens)).abs().max().item() <= 1e-3


@pytest.mark.te
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_te_spec_matches_hf_and_exports_bit_exactly(kind, tmp_path, groups):
    from safetensors.torch import load_file

    from megatron_rpt.conversion.converter import iter_hf_weights

    hf_dir = save_tiny_model(kind, tmp_path)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    built, logits = _logits("te", hf_dir, tokens, groups)
    assert built.spec == "te"
    assert (logits - hf_logits(hf_dir, tokens)).abs().max().item() <= 1e-3
    expected = load_file(hf_dir / "model.safetensors")
    streamed = dict(iter_hf_weights(built.chunks, built.arch, built.vocab.padded))
    assert sorted(streamed) == sorted(expected)
    assert all(torch.equal(streamed[n].cpu(), expected[n]) for n in expected)


@pytest.mark.parametrize("granularity", ["selective", "full"])
def test_activation_recomputation_gives_the_same_gradients(granularity, tmp_path, groups):
    from megatron_rpt.checkpoint.loading import build_pretrained

    hf_dir = save_tiny_model("qwen3", tmp_path)
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1)).cuda()
    position_ids = torch.arange(16, device="cuda")[None]
    grads = []
    for recompute in ("none", granularity):
        cfg = ModelConfig(hf_path=str(hf_dir), dtype="fp32", recompute_granularity=recompute)
        model = build_pretrained(cfg, ParallelConfig(), groups).chunks[0].train()
        model(tokens, position_ids, None).float().logsumexp(-1).sum().backward()
        grads.append(model.decoder.layers[0].mlp.linear_fc1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
