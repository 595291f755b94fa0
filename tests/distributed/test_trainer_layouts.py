"""Layout invariance of the training step: the same batch gives the same loss, gradient norm,
log-probs and update at TP1/PP1/DP1 (computed here, in one process), TP2, PP2, DP2 (2 gloo
ranks, one spawned run) and PP3 with 2 virtual stages per rank (3 ranks; the interleaved
schedule with fixed-shape micro-batches, packed and padded). Plus the sign test at DP2 with
Megatron's DistributedOptimizer (gradients reduce-scattered over DP; also with the DP
reduction and parameter all-gather overlapped), and the refusal of
virtual stages at PP2 (Megatron 0.16.1 swaps activations and gradients there).

Updates are compared with SGD at lr 1, no clipping and no weight decay, so the update is
exactly -grad: Adam's first step is ~lr * sign(grad) and would hide a wrong gradient scale
(the DistributedOptimizer run, Adam-only in Megatron, is compared on grad norm and update).
The batch has uneven sequence lengths; micro-batches hold several packed sequences.

Tolerance (fp32): loss 1e-6 absolute, grad norm 1e-6 relative, updates 1e-6 of the largest
update entry + 1e-7 (the rounding of (w + u) - w), log-probs 1e-5. Measured on the SGD
updates (largest entry 0.34): TP2 7e-8, PP2 3e-8, DP2 3e-8; Adam + DistributedOptimizer at DP2
1.1e-7 (updates ~1e-3; rtol 1e-3 there, see the test).
"""

import pytest
import torch

from megatron_rpt.testing.distributed import run_distributed
from megatron_rpt.testing.tiny_models import VOCAB, save_tiny_model

BUDGET = 24  # tokens per micro-batch: 2-3 micro-batches per DP rank for the test batch


def _run(hf_dir, *, tp=1, pp=1, vpp=None, adam=False, layout="packed", overlap=False):
    from megatron_rpt.trainer.config import OptimizerConfig, TrainConfig
    from tests.helpers.training import (
        build_policy_trainer,
        gather_full_parameters,
        random_rollout_batch,
    )

    if adam:
        opt = OptimizerConfig(
            lr=1e-3,
            use_distributed_optimizer=True,
            overlap_grad_reduce=overlap,
            overlap_param_gather=overlap,
        )
    else:
        opt = OptimizerConfig(
            optimizer="sgd",
            lr=1.0,
            weight_decay=0.0,
            clip_grad=0.0,
            use_distributed_optimizer=False,
        )
    ts = build_policy_trainer(
        hf_dir,
        tp=tp,
        pp=pp,
        vpp=vpp,
        optimizer=opt,
        train=TrainConfig(max_tokens_per_microbatch=BUDGET, micro_batch_layout=layout),
    )
    batch = random_rollout_batch(VOCAB, seed=7)
    logprobs = ts.compute_logprobs(batch)
    before = gather_full_parameters(ts.model_modules, ts.groups)
    metrics = ts.train_step(batch)
    ts.finish_param_sync()  # overlap_param_gather defers the all-gather to the next forward
    after = gather_full_parameters(ts.model_modules, ts.groups)
    return {
        "loss": metrics.loss,
        "grad_norm": metrics.grad_norm,
        "entropy": metrics.train["entropy"],
        "micro_batches": metrics.batch["micro_batches"],
        "logprobs": logprobs,
        "update": {k: after[k] - before[k] for k in after},
    }


def _sign_test_dp2(hf_dir):
    from megatron_rpt.trainer.config import OptimizerConfig, TrainConfig
    from tests.helpers.training import build_policy_trainer, random_rollout_batch

    ts = build_policy_trainer(
        hf_dir,
        optimizer=OptimizerConfig(lr=1e-4, use_distributed_optimizer=True),
        train=TrainConfig(max_tokens_per_microbatch=BUDGET),
    )
    batch = random_rollout_batch(VOCAB, seed=2)
    before = ts.compute_logprobs(batch)
    ts.train_step(batch)
    after = ts.compute_logprobs(batch)
    return [float((a - b).sum()) for a, b in zip(after, before, strict=True)]


def _layouts(rank, world_size, hf_dir, deep_dir):
    from megatron_rpt.errors import ConfigError

    out = {
        "tp2": _run(hf_dir, tp=2),
        "pp2": _run(hf_dir, pp=2),
        "dp2": _run(hf_dir),
        "dp2_adam_distopt": _run(hf_dir, adam=True),
        "dp2_adam_distopt_overlap": _run(hf_dir, adam=True, overlap=True),
        "sign_dp2": _sign_test_dp2(hf_dir),
    }
    try:
        _run(deep_dir, pp=2, vpp=3)
    except ConfigError as exc:
        out["vpp_at_pp2"] = str(exc)
    return out


def _interleaved(rank, world_size, deep_dir):
    return {
        "pp3_vpp2": _run(deep_dir, pp=3, vpp=2),
        "pp3_vpp2_padded": _run(deep_dir, pp=3, vpp=2, layout="padded"),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from megatron_rpt.distributed import single_process_group

    root = tmp_path_factory.mktemp("layouts")
    hf_dir = str(save_tiny_model("llama_tied", root / "tied"))  # PP splits the tied embedding
    deep_dir = str(save_tiny_model("qwen2", root / "deep", num_layers=6))
    with single_process_group():
        refs = {
            "sgd": _run(hf_dir),
            "adam": _run(hf_dir, adam=True),
            "deep": _run(deep_dir),
        }
    ranks = run_distributed(_layouts, 2, args=(hf_dir, deep_dir), timeout=300)
    for rank, out in enumerate(run_distributed(_interleaved, 3, args=(deep_dir,), timeout=300)):
        if rank < 2:
            ranks[rank].update(out)
        else:
            ranks.append(out)
    return refs, ranks


def _merged_update(ranks, name):
    merged = {}
    for out in ranks:
        merged.update(out[name]["update"])
    return merged


def _check(got, ref, name, *, update=True, min_scale=1e-2, rtol=1e-6):
    assert abs(got["loss"] - ref["loss"]) <= 1e-6, name
    assert abs(got["grad_norm"] - ref["grad_norm"]) <= 1e-6 * ref["grad_norm"], name
    assert abs(got["entropy"] - ref["entropy"]) <= 1e-5, name
    for a, b in zip(got["logprobs"], ref["logprobs"], strict=True):
        assert (a - b).abs().max().item() <= 1e-5, name
    if update:
        scale = max(u.abs().max().item() for u in ref["update"].values())
        assert scale > min_scale, name  # not trivially zero
        for key, ref_u in ref["update"].items():
            # + 1e-7: the fp32 rounding of (w + u) - w at |w| ~ 0.1 (matters for Adam's 1e-3 steps)
            assert (got["update"][key] - ref_u).abs().max().item() <= rtol * scale + 1e-7, (
                name,
                key,
            )


LAYOUTS = [
    "tp2",
    "pp2",
    "dp2",
    "pp3_vpp2",
    "pp3_vpp2_padded",
    "dp2_adam_distopt",
    "dp2_adam_distopt_overlap",  # overlap_grad_reduce + overlap_param_gather
]
REFERENCE = {
    "pp3_vpp2": "deep",
    "pp3_vpp2_padded": "deep",
    "dp2_adam_distopt": "adam",
    "dp2_adam_distopt_overlap": "adam",
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_same_loss_and_update_at_every_layout(results, name):
    refs, ranks = results
    ref = refs[REFERENCE.get(name, "sgd")]
    ranks = [out for out in ranks if name in out]
    for rank, out in enumerate(ranks):
        # Every rank reports the same metrics and log-probs (reduced/broadcast over PP and DP).
        _check(out[name], ref, f"{name}@rank{rank}", update=False)
    if name.startswith("pp"):
        update = _merged_update(ranks, name)  # each stage holds part of the model
        if name == "pp2":  # tied embeddings: the last stage's output layer is a synced copy
            assert torch.allclose(
                update["output_layer.weight"], update["embedding.word_embeddings.weight"], atol=1e-7
            )
    else:
        update = ranks[0][name]["update"]
        for key in update:  # replicas stay identical
            assert torch.equal(update[key], ranks[1][name]["update"][key]), (name, key)
    # Adam's first step is ~lr * g / (|g| + eps) per entry (1e-3): entries with |g| ~ eps turn
    # 1e-8 gradient differences into ~1e-7 update differences, hence rtol 1e-3 there.
    adam = "adam" in name
    _check(
        {**ranks[-1][name], "update": update},
        ref,
        name,
        min_scale=5e-4 if adam else 1e-2,
        rtol=1e-3 if adam else 1e-6,
    )


def test_virtual_stages_are_refused_at_pp2(results):
    _, ranks = results
    assert "pipeline_model_parallel_size >= 3" in ranks[0]["vpp_at_pp2"]


def test_dp2_micro_batches_are_split_over_ranks(results):
    refs, ranks = results
    # The same global batch: each DP rank runs fewer micro-batches than the single process.
    assert ranks[0]["dp2"]["micro_batches"] < refs["sgd"]["micro_batches"]
    assert ranks[0]["tp2"]["micro_batches"] == refs["sgd"]["micro_batches"]


def test_sign_with_distributed_optimizer_at_dp2(results):
    from tests.helpers.training import random_rollout_batch

    _, ranks = results
    advantages = [s.advantage for s in random_rollout_batch(VOCAB, seed=2).sequences]
    assert ranks[0]["sign_dp2"] == ranks[1]["sign_dp2"]
    for delta, adv in zip(ranks[0]["sign_dp2"], advantages, strict=True):
        assert (delta > 0) == (adv > 0), (ranks[0]["sign_dp2"], advantages)
