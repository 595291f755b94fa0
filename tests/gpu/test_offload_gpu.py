"""The colocated memory hand-off on one GPU (skipped without one).

* Trainer alone: ``TrainerOffload`` moves the optimizer state and gradients (bf16 model,
  distributed optimizer: fp32 main parameters too) to pinned host memory and empties the CUDA
  cache: allocated and reserved memory drop by what moved; training continues bitwise as
  without the hand-off. The peak allocated memory of each phase is printed.
* Trainer + SGLang (needs the SGLang runtime): the full colocated step on one GPU - train,
  sync through the per-engine path (engine TP 1: the rank's own CUDA-IPC payload; the engine
  resumes weights, then KV cache and CUDA graphs), trainer offload, greedy
  rollout whose tokens and log-probs match the trainer's forward, engine release (every tag),
  trainer reload, another step. The device-wide memory in use (``mem_get_info``) is printed
  for each phase.

Unverified: no GPU was lent while this was written (see docs/WEIGHT_SYNC_AND_MEMORY.md).
"""

from __future__ import annotations

import pytest
import torch

from megatron_rpt.rollout.types import SamplingParams
from megatron_rpt.testing.tiny_models import VOCAB, save_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]

MIB = 2**20
LOGPROB_TOL = 2e-3


def _device_used() -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


def _train(hf_dir, handoff):  # noqa: ANN001, ANN202
    from megatron_rpt.distributed import single_process_group
    from megatron_rpt.trainer.config import OptimizerConfig
    from megatron_rpt.trainer.offload import TrainerOffload
    from tests.helpers.training import build_policy_trainer, random_rollout_batch

    torch.cuda.set_device(0)
    with single_process_group():
        step = build_policy_trainer(
            hf_dir, dtype="bf16", optimizer=OptimizerConfig(use_distributed_optimizer=True)
        )
        offload = TrainerOffload.for_step(step, "optimizer" if handoff else "none")
        losses, phases = [], []
        for i in range(3):
            torch.cuda.reset_peak_memory_stats()
            losses.append(step.train_step(random_rollout_batch(VOCAB, seed=i)).loss)
            train_peak = torch.cuda.max_memory_allocated()
            torch.cuda.synchronize()
            allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
            moved = offload.offload().bytes
            phases.append({
                "train_peak": train_peak, "moved": moved,
                "allocated_drop": allocated - torch.cuda.memory_allocated(),
                "reserved_drop": reserved - torch.cuda.memory_reserved(),
            })  # fmt: skip
            offload.reload()
        weights = {n: p.detach().float().cpu() for c in step.chunks for n, p in c.named_parameters()}
        return losses, weights, phases


def test_trainer_offload_frees_gpu_memory_and_keeps_training_bitwise(tmp_path):
    hf_dir = str(save_tiny_model(
        "llama", tmp_path / "m", num_layers=4,
        config_overrides={"hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8,
                          "num_key_value_heads": 4},
    ))  # fmt: skip
    ref_losses, ref_weights, _ = _train(hf_dir, handoff=False)
    losses, weights, phases = _train(hf_dir, handoff=True)
    assert losses == ref_losses
    for name, tensor in weights.items():
        assert torch.equal(tensor, ref_weights[name]), name
    for p in phases:
        print({k: f"{v / MIB:.1f} MiB" for k, v in p.items()})
        assert p["moved"] > 50 * MIB
        assert p["allocated_drop"] >= 0.9 * p["moved"]
        assert p["reserved_drop"] >= 0.9 * p["moved"]  # empty_cache gave it to the driver


@pytest.mark.sglang_runtime
def test_colocated_trainer_and_sglang_hand_memory_back_and_forth(tmp_path):
    import torch.distributed as dist

    from megatron_rpt.distributed import single_process_group
    from megatron_rpt.model.logits import forward_logits
    from megatron_rpt.rollout.config import RolloutConfig
    from megatron_rpt.rollout.sglang_engine import SGLangEngine
    from megatron_rpt.trainer.offload import TrainerOffload
    from megatron_rpt.weight_sync import WeightSync, WeightSyncConfig
    from tests.helpers.rollout_helpers import smollm2_tokenizer, tiny_llama
    from tests.helpers.training import build_policy_trainer, random_rollout_batch

    tok = smollm2_tokenizer()
    served, trained = tmp_path / "served", tmp_path / "trained"
    for path, seed in ((served, 1), (trained, 0)):
        tiny_llama(tok, seed=seed).save_pretrained(path)
        tok.save_pretrained(path)
    torch.cuda.set_device(0)
    cfg = RolloutConfig(engine="sglang", mode="colocated")
    cfg.sglang.port, cfg.sglang.dtype, cfg.sglang.mem_fraction_static = 0, "float32", 0.3
    used: dict[str, float] = {}
    with single_process_group():
        step = build_policy_trainer(str(trained))
        engine = SGLangEngine.launch(cfg, str(served))
        try:
            offload = TrainerOffload.for_step(step, "optimizer")
            # The per-engine path at engine TP 1: this rank's CUDA-IPC payload, one per TP rank.
            sync = WeightSync(
                step.built, step.groups, engine, WeightSyncConfig(probe_tolerance=LOGPROB_TOL),
                engine_rank=0, engine_tp=1, engine_group=dist.new_group([0], backend="gloo"),
                engine_kind="sglang", sglang_bucket_bytes=4 * MIB,
            )  # fmt: skip
            for i in range(2):
                engine.release_memory()  # every tag: weights, KV cache, CUDA graphs
                used[f"train{i}_start"] = _device_used() / MIB
                step.train_step(random_rollout_batch(len(tok), seed=i))
                used[f"train{i}_end"] = _device_used() / MIB
                sync(version=i + 1)  # resumes weights, then KV cache and CUDA graphs
                offload.offload()
                used[f"rollout{i}"] = _device_used() / MIB
                prompt = tok.encode("The derivative of x squared is")
                (completion,) = engine.generate([prompt], SamplingParams(n=1, temperature=0.0, max_new_tokens=8))[0]
                offload.reload()
                ids = torch.tensor([prompt + completion.token_ids], device="cuda")
                logits = forward_logits(step.built, ids, step.groups)[0][len(prompt) - 1 : -1]
                assert logits.argmax(-1).tolist() == completion.token_ids
                ref = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None])[:, 0]
                assert (ref.cpu() - torch.tensor(completion.logprobs)).abs().max().item() < LOGPROB_TOL
        finally:
            engine.shutdown()
    print({k: f"{v:.0f} MiB" for k, v in used.items()}, "peak", f"{max(used.values()):.0f} MiB")
