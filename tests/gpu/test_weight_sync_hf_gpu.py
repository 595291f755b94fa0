"""Weight sync on CUDA without SGLang or TE: Megatron (local spec, fp32) on cuda:0 in an NCCL
group of world size 1, synced into the HF engine on the same GPU (skipped without a GPU).

Checks the gather/convert path with real NCCL collectives and CUDA tensors end to end: every
fingerprint matches (``verify='full'``), the probe agrees, and the engine's logits equal the
trainer's afterwards. TF32 is off so fp32 means fp32.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rpt.testing.tiny_models import VOCAB, save_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def nccl_groups():
    import torch.distributed as dist

    from megatron_rpt.distributed import initialize_model_parallel, seed_model_parallel

    torch.cuda.set_device(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        groups = initialize_model_parallel(1, 1)
        seed_model_parallel(0, groups)
        yield groups
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["qwen2", "llama_tied"])
def test_nccl_sync_into_cuda_hf_engine_matches_the_trainer(kind, tmp_path, nccl_groups):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from megatron_rpt.checkpoint.loading import build_pretrained
    from megatron_rpt.model.config import ModelConfig, ParallelConfig
    from megatron_rpt.model.logits import forward_logits
    from megatron_rpt.rollout.hf_engine import HFEngine
    from megatron_rpt.weight_sync import WeightSync, WeightSyncConfig
    from tests.helpers.rollout_helpers import smollm2_tokenizer
    from tests.helpers.updates import perturb_parameters

    assert dist.get_backend() == "nccl"
    hf_dir = save_tiny_model(kind, tmp_path / kind)
    built = build_pretrained(ModelConfig(hf_path=str(hf_dir), dtype="fp32"), ParallelConfig(), nccl_groups)
    assert all(p.is_cuda for c in built.chunks for p in c.parameters())
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).cuda().eval()
    engine = HFEngine(model, smollm2_tokenizer())
    assert perturb_parameters(built.chunks, built.arch, built.vocab.padded, 0, 1) > 0
    cfg = WeightSyncConfig(bucket_bytes=50_000, verify="full", probe_tolerance=1e-3)
    m = WeightSync(built, nccl_groups, engine, cfg)(version=1)
    assert m.pushed and m.buckets > 1 and m.checked_tensors == len(list(model.parameters()))
    assert m.probe_max_abs_diff is not None and m.probe_max_abs_diff < 1e-3
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        ours = engine.model(tokens).logits.float()
    diff = (ours - forward_logits(built, tokens, nccl_groups).to(ours.device)).abs().max()
    assert diff <= 1e-3
