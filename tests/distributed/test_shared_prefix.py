"""Exactness of the shared-prefix layout: the same loss, log-probs and EVERY parameter gradient
as the separate (packed) layout, for random GRPO-shaped groups (varying P, R_i and G, groups
of one included), at TP=1 (in this process), TP=2 and PP=2 (2 gloo ranks, one spawn) and PP=3
with 2 virtual stages (3 ranks; fixed-shape micro-batches); a few Adam steps give the same
losses both ways; bf16 loosely. About 30 s on 2 cores (marked slow).

Gradients are Megatron DDP's reduced ``main_grad`` after ``train_step`` (plain optimizer, no
clipping), gathered over TP and merged over PP stages. Tolerance (fp32): relative 1e-5, i.e.
per parameter tensor ``max |g_shared - g_separate| <= 1e-5 * max |g_separate|``; loss and
log-probs 1e-5 relative / absolute. The two layouts differ only in the order of
floating-point sums (the context's gradient is summed by autograd over the G responses in
one pass instead of by G passes); measured differences are ~1e-7 relative.
"""

import pytest
import torch

from megatron_rpt.testing.distributed import run_distributed
from megatron_rpt.testing.tiny_models import VOCAB, save_tiny_model

BUDGET = 40  # tokens per micro-batch: several micro-batches in both layouts
RTOL = 1e-5
SEEDS = (11, 12)

pytestmark = pytest.mark.slow


def _one_step(hf_dir, layout, seed, *, tp=1, pp=1, vpp=None, dtype="fp32"):
    from tests.helpers.training import random_group_batch, sgd_step_gradients

    batch = random_group_batch(VOCAB, seed=seed)
    return sgd_step_gradients(
        hf_dir, layout, batch, budget=BUDGET, tp=tp, pp=pp, vpp=vpp, dtype=dtype
    )


def _adam_steps(hf_dir, layout, steps=3):
    """Per step (loss, grad norm, entropy) of a few Adam steps, off-policy (the loss then
    depends on the model), then the log-probs under the final weights."""
    import math

    from megatron_rpt.trainer.config import OptimizerConfig, TrainConfig
    from tests.helpers.training import build_policy_trainer, random_group_batch

    ts = build_policy_trainer(
        hf_dir,
        optimizer=OptimizerConfig(lr=1e-3, use_distributed_optimizer=False),
        train=TrainConfig(max_tokens_per_microbatch=BUDGET, micro_batch_layout=layout),
    )
    old = -math.log(VOCAB)
    history = []
    for s in range(steps):
        m = ts.train_step(random_group_batch(VOCAB, seed=100 + s, old_logprob=old))
        history.append((m.loss, m.grad_norm, m.train["entropy"]))
    return history, ts.compute_logprobs(random_group_batch(VOCAB, seed=99))


def _both_layouts(hf_dir, seed, **kw):
    return {layout: _one_step(hf_dir, layout, seed, **kw) for layout in ("packed", "shared_prefix")}


def _spawned(rank, world_size, hf_dir):
    return {
        "tp2": _both_layouts(hf_dir, SEEDS[0], tp=2),
        "pp2": _both_layouts(hf_dir, SEEDS[1], pp=2),
    }


def _interleaved(rank, world_size, deep_dir):
    # Virtual stages: micro-batches padded to one shape (pad_to_common_shape adds a piece).
    return {"pp3_vpp2": _both_layouts(deep_dir, SEEDS[0], pp=3, vpp=2)}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from megatron_rpt.distributed import single_process_group

    root = tmp_path_factory.mktemp("shared_prefix")
    tied = str(save_tiny_model("llama_tied", root / "tied"))  # PP splits the tied embedding
    qwen3 = str(save_tiny_model("qwen3", root / "qwen3"))  # q/k norm, head_dim != H / heads
    deep = str(save_tiny_model("qwen2", root / "deep", num_layers=6))
    out = {}
    with single_process_group():
        for seed in SEEDS:
            out[f"tp1_qwen3_{seed}"] = _both_layouts(qwen3, seed)
        out["adam"] = {layout: _adam_steps(tied, layout) for layout in ("packed", "shared_prefix")}
        out["bf16"] = _both_layouts(qwen3, SEEDS[0], dtype="bf16")
    ranks = run_distributed(_spawned, 2, args=(tied,), timeout=300)
    for rank, extra in enumerate(run_distributed(_interleaved, 3, args=(deep,), timeout=300)):
        if rank < 2:
            ranks[rank].update(extra)
        else:
            ranks.append(extra)
    return out, ranks


def _merged_grads(ranks, name, layout):
    merged = {}
    for out in ranks:
        merged.update(out[name][layout]["grads"])
    return merged


def _check_exact(sep, shared, sep_grads, shared_grads, name):
    assert abs(shared["loss"] - sep["loss"]) <= RTOL * max(abs(sep["loss"]), 1e-3), name
    assert abs(shared["grad_norm"] - sep["grad_norm"]) <= RTOL * sep["grad_norm"], name
    for a, b in zip(shared["logprobs"], sep["logprobs"], strict=True):
        assert (a - b).abs().max().item() <= RTOL, name
    assert set(shared_grads) == set(sep_grads)
    for key, ref in sep_grads.items():
        scale = ref.abs().max().item()
        assert scale > 0, (name, key)  # every parameter gets a gradient
        diff = (shared_grads[key] - ref).abs().max().item()
        assert diff <= RTOL * scale, (name, key, diff / scale)
    # The point of the layout: fewer tokens for the same loss.
    assert shared["layout_tokens"] < sep["layout_tokens"], name


@pytest.mark.parametrize("seed", SEEDS)
def test_tp1_loss_logprobs_and_every_gradient_equal_separate_layout(results, seed):
    out, _ = results
    run = out[f"tp1_qwen3_{seed}"]
    sep, shared = run["packed"], run["shared_prefix"]
    assert sep["micro_batches"] > 1 and shared["micro_batches"] > 1
    _check_exact(sep, shared, sep["grads"], shared["grads"], f"tp1 seed {seed}")


@pytest.mark.parametrize("name", ["tp2", "pp2", "pp3_vpp2"])
def test_tp2_pp2_every_gradient_equals_separate_layout(results, name):
    _, ranks = results
    ranks = [out for out in ranks if name in out]
    for rank, out in enumerate(ranks):  # metrics and log-probs reach every rank
        run = out[name]
        for a, b in zip(run["shared_prefix"]["logprobs"], run["packed"]["logprobs"], strict=True):
            assert (a - b).abs().max().item() <= RTOL, (name, rank)
    sep_grads = _merged_grads(ranks, name, "packed")
    shared_grads = _merged_grads(ranks, name, "shared_prefix")
    run = ranks[-1][name]
    _check_exact(run["packed"], run["shared_prefix"], sep_grads, shared_grads, name)
    if name.startswith("pp"):  # the stages hold disjoint parts of the model
        assert (
            "embedding.word_embeddings.weight" in sep_grads and "output_layer.weight" in sep_grads
        )


def test_several_adam_steps_give_the_same_losses(results):
    out, _ = results
    (sep, sep_lp), (shared, shared_lp) = out["adam"]["packed"], out["adam"]["shared_prefix"]
    assert len({step[0] for step in sep}) == len(sep)  # the loss moves between steps
    for a, b in zip(sep, shared, strict=True):
        for x, y in zip(a, b, strict=True):  # loss, grad norm, entropy
            assert abs(x - y) <= RTOL * max(abs(x), 1e-3), (sep, shared)
    for a, b in zip(sep_lp, shared_lp, strict=True):  # the weights after the run
        assert (a - b).abs().max().item() <= RTOL


def test_bf16_loosely(results):
    out, _ = results
    sep, shared = out["bf16"]["packed"], out["bf16"]["shared_prefix"]
    assert abs(shared["loss"] - sep["loss"]) <= 2e-2 * max(abs(sep["loss"]), 1e-2)
    for key, ref in sep["grads"].items():
        got = shared["grads"][key].flatten()
        cos = torch.nn.functional.cosine_similarity(got, ref.flatten(), dim=0).item()
        assert cos >= 0.99, (key, cos)
