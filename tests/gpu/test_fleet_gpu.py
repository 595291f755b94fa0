"""Colocated trainer + SGLang engine on one GPU, driven through the engine fleet (GPU only).

The fleet (one engine of one GPU, ``EngineFleet`` + ``EngineGuard`` around ``SGLangEngine``)
starts the engine from weights other than the trainer's and pushes the trainer's; then two
rounds of the loop's engine calls: generate -> release (``after_rollout``) -> weight push (the
engine resumes its memory). After every push the engine's greedy outputs and log-probs equal
the Megatron trainer's forward. The peak GPU memory of the process (trainer side, PyTorch
allocator) and the device's used memory at the peak point (trainer + SGLang server) are
printed and checked against the device size.

Skipped without a GPU and the SGLang runtime (conftest markers). Unverified here: no GPU was
lent while this was written.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rpt.rollout.types import SamplingParams
from tests.gpu.test_weight_sync_gpu import LOGPROB_TOL, _check_matches_trainer

pytestmark = [pytest.mark.gpu, pytest.mark.sglang_runtime, pytest.mark.timeout(900)]


def test_colocated_fleet_release_resume_matches_trainer(tmp_path):
    from megatron_rpt.checkpoint.loading import build_pretrained
    from megatron_rpt.distributed import (
        initialize_model_parallel,
        seed_model_parallel,
        single_process_group,
    )
    from megatron_rpt.model.config import ModelConfig, ParallelConfig
    from megatron_rpt.rollout.config import RolloutConfig
    from megatron_rpt.rollout.placement import EnginePlacement
    from megatron_rpt.rollout.scheduling import RolloutRequest
    from megatron_rpt.rollout.sglang_engine import SGLangEngine
    from megatron_rpt.trainer.engine_guard import EngineGuard
    from megatron_rpt.trainer.fleet import EngineFleet
    from megatron_rpt.weight_sync import WeightSync, WeightSyncConfig
    from tests.helpers.rollout_helpers import smollm2_tokenizer, tiny_llama
    from tests.helpers.updates import perturb_parameters

    tok = smollm2_tokenizer()
    served, trained = tmp_path / "served", tmp_path / "trained"
    for path, seed in ((served, 1), (trained, 0)):
        tiny_llama(tok, seed=seed).save_pretrained(path)
        tok.save_pretrained(path)
    torch.cuda.set_device(0)
    total = torch.cuda.get_device_properties(0).total_memory
    with single_process_group():
        groups = initialize_model_parallel(1, 1)
        seed_model_parallel(0, groups)
        built = build_pretrained(
            ModelConfig(hf_path=str(trained), dtype="fp32"), ParallelConfig(), groups
        )
        cfg = RolloutConfig(engine="sglang", mode="colocated")
        cfg.sglang.port, cfg.sglang.dtype, cfg.sglang.mem_fraction_static = 0, "float32", 0.3
        cfg.sglang.extra_args = {"disable-cuda-graph": True}
        guard = EngineGuard(lambda: SGLangEngine.launch(cfg, str(served)), timeout_s=600)
        wsync = WeightSync(
            built, groups, guard, WeightSyncConfig(verify="checksum", probe_tolerance=LOGPROB_TOL)
        )
        fleet = EngineFleet(
            EnginePlacement(1, 1), guard, lambda version, engines: wsync(version=version),
            rank=0, max_restarts=0, block_contexts=8, release_after_rollout=True,
        )  # fmt: skip
        used_peak = 0
        try:
            fleet.start(version=0)
            _check_matches_trainer(built, groups, guard, tok)
            for version in (1, 2):
                requests = [
                    RolloutRequest("d", i, tuple(tok.encode(f"Count to {i}:"))) for i in range(3)
                ]
                fleet.generate(requests, SamplingParams(n=2, max_new_tokens=8, seed=version))
                free, _ = torch.cuda.mem_get_info()
                used_peak = max(used_peak, total - free)  # engine resumed: its peak
                fleet.after_rollout()  # the engine releases weights and KV cache
                perturb_parameters(built.chunks, built.arch, built.vocab.padded, 0, 1, seed=version)
                fleet.push_weights(version)  # resumes the engine's memory, pushes, verifies
                _check_matches_trainer(built, groups, guard, tok)
        finally:
            fleet.shutdown()
    trainer_peak = torch.cuda.max_memory_allocated()
    print(f"peak memory: trainer (allocator) {trainer_peak / 2**30:.2f} GiB, "
          f"device used during rollout {used_peak / 2**30:.2f} GiB of {total / 2**30:.0f} GiB")  # fmt: skip
    assert 0 < trainer_peak < used_peak <= total
