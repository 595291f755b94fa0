"""Context parallelism on GPUs with Transformer Engine (skipped elsewhere; see conftest.py).
Written on a CPU-only machine: not run there.

* ``cp_row_index`` (trainer/context_parallel.py) picks the rows TE's own
  ``thd_get_partitioned_indices`` picks;
* on 2 GPUs, one SGD step of the tiny Qwen3 model with ``parallel.context_parallel_size=2``
  (DP 1, packed layout, TE's ring attention) gives the log-probs, loss and gradients of the same
  batch at CP 1 (DP 2), to bf16 rounding;
* the setting reaches Megatron's TransformerConfig and the preflight accepts the packed layout
  and refuses the shared-prefix one.

The CPU tier covers the split's bookkeeping (tests/unit/test_context_parallel.py,
tests/distributed/test_context_parallel_loss.py) and the refusals on CPU
(tests/unit/test_model_config.py, tests/unit/test_trainer_step.py).
"""

import pytest
import torch

from megatron_rpt import capabilities
from megatron_rpt.config import RPTConfig
from megatron_rpt.errors import ConfigError
from megatron_rpt.model.arch import arch_from_dict
from megatron_rpt.model.config import ModelConfig, ParallelConfig
from megatron_rpt.testing.tiny_models import tiny_config_dict

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not capabilities.have_te(), reason="needs Transformer Engine"),
]

SHAPES = ((37, 21), (5, 64), (120, 9), (16, 16), (3, 1), (64, 40))  # ragged (prompt, response)


def test_cp_reaches_the_te_transformer_config():
    from megatron_rpt.model.build import build_transformer_config

    arch = arch_from_dict(tiny_config_dict("qwen3"))
    config = build_transformer_config(
        arch, ModelConfig(dtype="bf16", spec="te"), ParallelConfig(context_parallel_size=2)
    )
    assert config.context_parallel_size == 2


def test_preflight_accepts_packed_and_refuses_shared_prefix():
    from megatron_rpt.preflight import check_context_parallel

    cfg = RPTConfig()
    cfg.parallel.context_parallel_size = 2
    cfg.train.micro_batch_layout = "packed"
    check_context_parallel(cfg)
    cfg.train.micro_batch_layout = "shared_prefix"
    with pytest.raises(ConfigError, match="micro_batch_layout=packed only"):
        check_context_parallel(cfg)


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_row_index_matches_te_partitioned_indices(cp):
    import transformer_engine_torch as tex

    from megatron_rpt.trainer.context_parallel import cp_row_index, padded_offsets

    cu = padded_offsets(torch.tensor([0, 7, 40, 41, 97]), 2 * cp)
    total = int(cu[-1])
    for rank in range(cp):
        want = tex.thd_get_partitioned_indices(cu.int().cuda(), total, cp, rank)
        assert cp_row_index(cu, cp, rank).tolist() == want.long().cpu().tolist()


def _cp_worker(rank, world_size, hf_dir, cp):
    from megatron_rpt.testing.tiny_models import VOCAB
    from megatron_rpt.trainer.config import OptimizerConfig, TrainConfig
    from tests.helpers.training import (
        build_policy_trainer,
        gather_full_gradients,
        random_rollout_batch,
    )

    sgd = OptimizerConfig(
        optimizer="sgd", lr=1e-3, weight_decay=0.0, clip_grad=0.0, use_distributed_optimizer=False
    )
    ts = build_policy_trainer(
        hf_dir,
        spec="te",
        dtype="bf16",
        cp=cp,
        optimizer=sgd,
        train=TrainConfig(max_tokens_per_microbatch=160, micro_batch_layout="packed"),
    )
    assert ts.groups.cp_size == cp
    batch = random_rollout_batch(VOCAB, shapes=SHAPES, seed=4)
    logprobs = ts.compute_logprobs(batch)
    metrics = ts.train_step(batch)
    grads = gather_full_gradients(ts.model_modules, ts.groups)
    return (
        [lp.numpy() for lp in logprobs],
        {"loss": metrics.loss, "grad_norm": metrics.grad_norm, **metrics.train},
        {k: v.numpy() for k, v in grads.items()},
    )


@pytest.mark.te
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cp2_training_matches_cp1(tmp_path):
    from megatron_rpt.testing.distributed import run_distributed
    from megatron_rpt.testing.tiny_models import save_tiny_model

    hf_dir = str(save_tiny_model("qwen3", tmp_path))
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    runs = {
        cp: run_distributed(
            _cp_worker, 2, args=(hf_dir, cp), timeout=600, env=env, backend="nccl"
        )
        for cp in (1, 2)
    }
    ref_lp, ref_m, ref_g = runs[1][0]
    for lp, m, g in runs[2]:  # both CP ranks return the whole batch's values
        for a, b in zip(lp, ref_lp, strict=True):
            # a wrong split (a token seeing the wrong keys, or the wrong label) moves log-probs
            # by far more than bf16 rounding (~1e-2 here)
            assert abs(a - b).max() <= 5e-2
        assert m["num_tokens"] == ref_m["num_tokens"] == sum(r for _, r in SHAPES)
        assert m["loss"] == pytest.approx(ref_m["loss"], rel=2e-2, abs=2e-3)
        assert m["grad_norm"] == pytest.approx(ref_m["grad_norm"], rel=2e-2)
        for key, ref in ref_g.items():
            got, ref = torch.from_numpy(g[key]).flatten(), torch.from_numpy(ref).flatten()
            cos = torch.nn.functional.cosine_similarity(got, ref, dim=0).item()
            assert cos >= 0.99, (key, cos)
