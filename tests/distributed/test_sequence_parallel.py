"""Sequence parallelism and activation recompute keep the training step exact.

One training step on the same GRPO-shaped batch (uneven groups, so the packed rows have odd
lengths and sequence parallelism must pad them to a multiple of TP) gives the same loss,
gradient norm, log-probs and EVERY parameter gradient as the plain TP=1 run:

* recompute (full: whole layers; selective: core attention) at TP=1, in this process, with
  the packed and shared-prefix layouts: the recomputed forward is the same arithmetic, so
  gradients agree to rounding (measured: bit-identical);
* sequence parallelism at TP=2 (2 gloo ranks, one spawn) with the packed, shared-prefix and
  padded layouts, and with full recompute on top (shared-prefix). The qwen3 tiny model has
  q/k norms and untied embeddings, the llama one ties them (the fused loss then uses the
  embedding as output weight, whose gradient also comes from the scattered embedding).

Gradients are Megatron DDP's reduced ``main_grad`` after ``train_step`` (SGD, no clipping),
gathered over TP. Tolerance (fp32): per parameter tensor ``max |g - g_ref| <= 1e-5 *
max |g_ref|``; loss 1e-6, log-probs 1e-5. Measured: ~1e-7 relative (SP changes where the
sums over TP happen, not what is summed).
"""

import pytest
import torch

from megatron_rpt.testing.distributed import run_distributed
from megatron_rpt.testing.tiny_models import VOCAB, save_tiny_model

BUDGET = 40  # tokens per micro-batch: several micro-batches
SEED = 21
RTOL = 1e-5

pytestmark = pytest.mark.slow


def _one_step(hf_dir, layout, *, tp=1, sp=False, recompute="none"):
    from tests.helpers.training import random_group_batch, sgd_step_gradients

    batch = random_group_batch(VOCAB, seed=SEED)
    return sgd_step_gradients(
        hf_dir, layout, batch, budget=BUDGET, tp=tp, sequence_parallel=sp, recompute=recompute
    )


RUNS_TP2 = {
    "qwen3_sp_packed": ("qwen3", "packed", {}),
    "qwen3_sp_shared_prefix": ("qwen3", "shared_prefix", {}),
    "qwen3_sp_padded": ("qwen3", "padded", {}),
    "llama_tied_sp_shared_prefix": ("llama_tied", "shared_prefix", {}),
    "qwen3_sp_full_recompute_shared_prefix": ("qwen3", "shared_prefix", {"recompute": "full"}),
}
RUNS_TP1 = {
    "qwen3_full_recompute_packed": ("qwen3", "packed", "full"),
    "qwen3_full_recompute_shared_prefix": ("qwen3", "shared_prefix", "full"),
    "qwen3_selective_recompute_packed": ("qwen3", "packed", "selective"),
    "qwen3_selective_recompute_shared_prefix": ("qwen3", "shared_prefix", "selective"),
}


def _spawned(rank, world_size, dirs):
    return {
        name: _one_step(dirs[model], layout, tp=2, sp=True, **kw)
        for name, (model, layout, kw) in RUNS_TP2.items()
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from megatron_rpt.distributed import single_process_group

    root = tmp_path_factory.mktemp("sp")
    dirs = {kind: str(save_tiny_model(kind, root / kind)) for kind in ("qwen3", "llama_tied")}
    refs, runs = {}, {}
    with single_process_group():
        for model, layout in {(m, lay) for m, lay, _ in RUNS_TP2.values()}:
            refs[(model, layout)] = _one_step(dirs[model], layout)
        for name, (model, layout, recompute) in RUNS_TP1.items():
            runs[name] = _one_step(dirs[model], layout, recompute=recompute)
    ranks = run_distributed(_spawned, 2, args=(dirs,), timeout=600)
    return refs, runs, ranks


def _check(got, ref, name):
    assert abs(got["loss"] - ref["loss"]) <= 1e-6, name
    assert abs(got["grad_norm"] - ref["grad_norm"]) <= 1e-6 * ref["grad_norm"] + 1e-7, name
    for a, b in zip(got["logprobs"], ref["logprobs"], strict=True):
        assert (a - b).abs().max().item() <= 1e-5, name
    assert got["grads"].keys() == ref["grads"].keys(), name
    for key, g_ref in ref["grads"].items():
        scale = g_ref.abs().max().item()
        diff = (got["grads"][key] - g_ref).abs().max().item()
        assert diff <= RTOL * scale + 1e-9, (name, key, diff, scale)


@pytest.mark.parametrize("name", sorted(RUNS_TP1))
def test_recompute_gives_the_same_gradients(results, name):
    refs, runs, _ = results
    model, layout, _ = RUNS_TP1[name]
    _check(runs[name], refs[(model, layout)], name)


@pytest.mark.parametrize("name", sorted(RUNS_TP2))
def test_sequence_parallel_at_tp2_gives_the_same_gradients(results, name):
    refs, _, ranks = results
    model, layout, _ = RUNS_TP2[name]
    for rank, out in enumerate(ranks):
        assert out[name]["alignment"] == 2, name  # rows padded to a multiple of TP
        _check(out[name], refs[(model, layout)], f"{name}@rank{rank}")


def test_layer_norm_gradients_are_reduced_over_tp(results):
    """Under SP each rank sees half the tokens: without the TP sum of the norm weights'
    gradients (TorchNorm's mark) they would differ between ranks and from TP=1."""
    _, _, ranks = results
    name = "qwen3_sp_packed"
    norms = [k for k in ranks[0][name]["grads"] if "layernorm" in k or "final_norm" in k]
    assert norms, sorted(ranks[0][name]["grads"])
    for key in norms:
        assert torch.equal(ranks[0][name]["grads"][key], ranks[1][name]["grads"][key]), key
