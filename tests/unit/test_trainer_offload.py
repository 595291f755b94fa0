"""The trainer's colocated memory hand-off on CPU (trainer/offload.py, memory.py).

* N training steps with an offload/reload around each step's "rollout" give bitwise the same
  losses and weights as N steps without, for fp32 with the plain optimizer and bf16 with the
  distributed optimizer (separate fp32 main parameters), in 'optimizer' and 'all' modes;
* while offloaded the storages really are empty, and views (``main_grad``, Adam state) are the
  same objects afterwards;
* the process's resident set drops by most of the offloaded bytes (measured, generous margin).
"""

from __future__ import annotations

import gc

import pytest
import torch

from megatron_rpt.testing.tiny_models import VOCAB, save_tiny_model

STEPS = 3


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return str(save_tiny_model("qwen2", tmp_path_factory.mktemp("offload") / "qwen2"))


def _train(hf_dir, mode, dtype, dist_opt, spill_dir):
    from megatron_rpt.distributed import single_process_group
    from megatron_rpt.trainer.config import OptimizerConfig
    from megatron_rpt.trainer.offload import TrainerOffload
    from tests.helpers.training import build_policy_trainer, random_rollout_batch

    with single_process_group():
        step = build_policy_trainer(
            hf_dir, dtype=dtype, optimizer=OptimizerConfig(use_distributed_optimizer=dist_opt)
        )
        offload = TrainerOffload.for_step(step, mode or "none", spill_dir=spill_dir)
        losses, moved = [], []
        for i in range(STEPS):
            metrics = step.train_step(random_rollout_batch(VOCAB, seed=i))
            losses.append(metrics.loss)
            if mode is not None:
                report = offload.offload()
                moved.append(report.bytes)
                empty = [t for t in offload.tensors() if t.untyped_storage().nbytes() != 0]
                assert empty == [] and offload.offloaded
                assert list(spill_dir.iterdir())  # the bytes are in a file meanwhile
                offload.reload()
                assert not offload.offloaded and not list(spill_dir.iterdir())
        weights = {n: p.detach().clone() for c in step.chunks for n, p in c.named_parameters()}
        return losses, weights, moved


@pytest.mark.parametrize(
    ("dtype", "dist_opt", "mode"),
    [("fp32", False, "optimizer"), ("bf16", True, "optimizer"), ("bf16", True, "all")],
)
def test_training_with_hand_off_is_bitwise_identical(hf_dir, tmp_path, dtype, dist_opt, mode):
    ref_losses, ref_weights, _ = _train(hf_dir, None, dtype, dist_opt, tmp_path)
    losses, weights, moved = _train(hf_dir, mode, dtype, dist_opt, tmp_path)
    assert losses == ref_losses  # exact floats
    assert weights.keys() == ref_weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, ref_weights[name]), name
    n_params = sum(t.numel() for t in weights.values())
    # Adam's two moments in fp32 at least; 'all' also the parameters.
    assert all(m >= 8 * n_params for m in moved), (moved, n_params)
    if mode == "all":
        assert all(m >= 8 * n_params + 2 * n_params for m in moved)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs /proc")
def test_offload_frees_resident_memory(tmp_path):
    """A ~10M-parameter model: Adam state + gradients are ~120 MB; at least half of what was
    offloaded must leave the resident set, and it must come back on reload."""
    from megatron_rpt.distributed import single_process_group
    from megatron_rpt.trainer.offload import TrainerOffload
    from tests.helpers.training import build_policy_trainer, random_rollout_batch

    big = save_tiny_model(
        "llama", tmp_path / "big", num_layers=4,
        config_overrides={"hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8,
                          "num_key_value_heads": 4},
    )  # fmt: skip
    spill = tmp_path / "spill"
    spill.mkdir()
    with single_process_group():
        step = build_policy_trainer(str(big))
        step.train_step(random_rollout_batch(VOCAB))
        offload = TrainerOffload.for_step(step, "optimizer", spill_dir=spill)
        gc.collect()
        before = _rss_bytes()
        moved = offload.offload().bytes
        during = _rss_bytes()
        offload.reload()
        after = _rss_bytes()
    assert moved > 100 * 2**20
    assert before - during > 0.5 * moved, (before, during, moved)
    assert after - during > 0.5 * moved, (during, after, moved)


def test_bad_mode_and_reload_without_offload():
    from megatron_rpt.trainer.offload import TrainerOffload

    with pytest.raises(ValueError, match="offload_trainer"):
        TrainerOffload([], None, "params")  # type: ignore[arg-type]
    none = TrainerOffload([], None, "none")
    assert none.offload().bytes == 0 and none.reload() >= 0.0 and not none.offloaded


def test_hf_engine_release_spills_weights_and_resume_restores_them(tmp_path):
    """The engine's half on CPU: release frees every weight (written to spill_dir), resume
    brings back the exact bytes, generation is refused in between and identical after."""
    from megatron_rpt.rollout.hf_engine import HFEngine
    from megatron_rpt.rollout.types import SamplingParams
    from tests.helpers.rollout_helpers import smollm2_tokenizer, tiny_llama

    tok = smollm2_tokenizer()
    engine = HFEngine(tiny_llama(tok), tok, spill_dir=tmp_path)
    params = SamplingParams(n=2, max_new_tokens=4, seed=3)
    before = {n: p.clone() for n, p in engine.model.state_dict().items()}
    out = engine.generate([[1, 2, 3]], params)
    engine.release_memory()
    assert all(p.untyped_storage().nbytes() == 0 for p in engine.model.parameters())
    assert list(tmp_path.iterdir()) and not engine.health()
    with pytest.raises(RuntimeError, match="released"):
        engine.generate([[1, 2, 3]], params)
    engine.resume_memory()
    assert not list(tmp_path.iterdir()) and engine.health()
    for name, tensor in engine.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    again = engine.generate([[1, 2, 3]], params)
    assert [c.token_ids for c in again[0]] == [c.token_ids for c in out[0]]
