"""The shared-prefix layout on a GPU (skipped without one; never run on the CPU-only machine
it was written on): the local spec (torch SDPA per piece with ``causal_lower_right``, i.e.
flash / memory-efficient kernels) and the Transformer Engine spec (one variable-length TE call
with ``padding_causal_bottom_right``, model/specs.py) against the separate layout, and TE's
attention module against a dense-mask reference.
"""

import pytest
import torch

from megatron_rpt.model.shared_prefix import SharedPrefixParams, dense_reference_mask, group_pieces
from megatron_rpt.testing.tiny_models import VOCAB, save_tiny_model
from tests.helpers.attention import reference_attention

pytestmark = pytest.mark.gpu


def _step(hf_dir, layout, spec, dtype):
    from megatron_rpt.trainer.config import OptimizerConfig, TrainConfig
    from tests.helpers.training import (
        build_policy_trainer,
        gather_full_gradients,
        random_group_batch,
    )

    sgd = OptimizerConfig(
        optimizer="sgd", lr=1e-3, weight_decay=0.0, clip_grad=0.0, use_distributed_optimizer=False
    )
    ts = build_policy_trainer(
        hf_dir,
        spec=spec,
        dtype=dtype,
        optimizer=sgd,
        train=TrainConfig(max_tokens_per_microbatch=160, micro_batch_layout=layout),
    )
    assert ts.built.spec == spec
    batch = random_group_batch(
        VOCAB, seed=5, prompt_lens=(20, 60), group_sizes=(1, 6), response_lens=(4, 24)
    )
    logprobs = ts.compute_logprobs(batch)
    metrics = ts.train_step(batch)
    return logprobs, metrics, gather_full_gradients(ts.model_modules, ts.groups)


def _compare(spec, dtype, hf_dir, *, lp_tol, grad_check):
    sep_lp, sep_m, sep_g = _step(hf_dir, "packed", spec, dtype)
    sh_lp, sh_m, sh_g = _step(hf_dir, "shared_prefix", spec, dtype)
    assert sh_m.batch["layout_tokens"] < sep_m.batch["layout_tokens"]
    for a, b in zip(sh_lp, sep_lp, strict=True):
        assert (a - b).abs().max().item() <= lp_tol
    for key, ref in sep_g.items():
        grad_check(sh_g[key], ref, key)


def test_local_spec_fp32_equals_separate_layout(tmp_path, process_group):
    torch.backends.cuda.matmul.allow_tf32 = False
    hf_dir = save_tiny_model("qwen3", tmp_path)

    def check(got, ref, key):
        assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item(), key

    _compare("local", "fp32", hf_dir, lp_tol=1e-4, grad_check=check)


@pytest.mark.te
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_te_spec_bf16_equals_separate_layout(kind, tmp_path, process_group):
    hf_dir = save_tiny_model(kind, tmp_path)

    def check(got, ref, key):
        cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item()
        assert cos >= 0.99, (key, cos)

    # A wrong mask (a response seeing another one, or the context cut short) moves log-probs
    # by far more than bf16 rounding (~1e-2 here).
    _compare("te", "bf16", hf_dir, lp_tol=5e-2, grad_check=check)


@pytest.mark.te
def test_te_attention_module_matches_dense_mask_reference(process_group):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_rpt.distributed import initialize_model_parallel
    from megatron_rpt.model.specs import te_shared_prefix_attention

    groups = initialize_model_parallel(1, 1)
    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=256,
        num_attention_heads=4,
        num_query_groups=2,
        attention_dropout=0.0,
        bf16=True,
        params_dtype=torch.bfloat16,
    )
    attn = te_shared_prefix_attention()(
        cfg, 1, AttnMaskType.causal, "self", pg_collection=groups.pg_collection
    ).cuda()
    pieces, row = [], 0
    for prompt, responses in [(37, [5, 19, 1, 8]), (3, [2]), (64, [16, 16])]:
        pieces += group_pieces(row, prompt, responses)
        row += prompt + sum(responses)
    params = SharedPrefixParams.from_pieces(pieces, device="cuda")
    params.rotary_per_token = True
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(row, 1, 4, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (
        torch.randn(row, 1, 2, 64, device="cuda", generator=g, dtype=torch.bfloat16)
        for _ in range(2)
    )
    for t in (q, k, v):
        t.requires_grad_(True)
    out = attn(q, k, v, None, AttnMaskType.causal, packed_seq_params=params)
    assert out.shape == (row, 1, 256)
    visible = dense_reference_mask(pieces, row).cuda()
    qf, kf, vf = (t.detach().float().squeeze(1).requires_grad_(True) for t in (q, k, v))
    ref = reference_attention(qf, kf, vf, visible)
    assert (out[:, 0].float() - ref).abs().max().item() <= 2e-2
    weights = torch.randn(row, 256, device="cuda", generator=g)
    grads = torch.autograd.grad((out[:, 0].float() * weights).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weights).sum(), (qf, kf, vf))
    for a, b in zip(grads, ref_grads, strict=True):
        err = (a.float().squeeze(1) - b).abs().max().item()
        assert err <= 3e-2 * b.abs().max().item(), err
    # Any other call is Megatron's TEDotProductAttention unchanged (plain causal, sbhd).
    plain = attn(q, k, v, None, AttnMaskType.causal)
    causal = torch.ones(row, row, dtype=torch.bool, device="cuda").tril()
    assert (plain[:, 0].float() - reference_attention(qf, kf, vf, causal)).abs().max() <= 2e-2
