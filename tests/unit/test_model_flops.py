"""FLOP accounting: the parameter count against real HF modules, the attention and decode sums
against explicit loops, and the counter the trainer will call."""

from __future__ import annotations

import pytest
import torch

from megatron_rpt.model.arch import arch_from_dict, read_arch
from megatron_rpt.model.flops import FlopsCounter, ModelFlops, rollout_flops, training_flops
from megatron_rpt.testing.tiny_models import save_tiny_model


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "qwen2", "qwen3"])
def test_matmul_parameters_equal_the_linear_layers_of_the_hf_model(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(kind, tmp_path / kind)
    model = AutoModelForCausalLM.from_pretrained(path)
    linear = {
        n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    m = ModelFlops.from_arch(read_arch(path))
    assert m.n_head == linear.pop("lm_head")
    assert m.n_body == sum(linear.values())


def _arch(layers=2, hidden=16, heads=4, kv=2, inter=24, vocab=50):
    return arch_from_dict({
        "architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": inter,
        "vocab_size": vocab,
    })  # fmt: skip


def _attn_loop(arch, queries_keys: list[int]) -> int:
    """QK^T + PV FLOPs by explicit loops: 2*d per (query, key) each, per head and layer."""
    total = 0
    for _layer in range(arch.num_layers):
        for _head in range(arch.num_attention_heads):
            for n_keys in queries_keys:
                for _key in range(n_keys):
                    total += 2 * arch.head_dim + 2 * arch.head_dim
    return total


def test_forward_training_and_rollout_match_explicit_loops():
    arch = _arch()
    m = ModelFlops.from_arch(arch)
    per_token = 2 * m.n_body  # body matmuls, 2 FLOPs per multiply-add
    s = 7
    assert m.forward(s, s) == s * (per_token + 2 * m.n_head) + _attn_loop(
        arch, list(range(1, s + 1))
    )
    # training: 3 passes; only response positions go through the output layer by default
    p, r = 5, 3
    fwd = (p + r) * per_token + r * 2 * m.n_head + _attn_loop(arch, list(range(1, p + r + 1)))
    assert m.training(p, r) == 3 * fwd
    assert m.training(p, r, recompute=True, extra_forward_passes=1) == 5 * fwd
    assert m.training(p, r, head_on_all_tokens=True) == 3 * m.forward(p + r, p + r)
    # rollout: one prefill (logits at its last position), then R-1 single-token decode steps
    responses = [4, 1, 6]
    expected = p * per_token + 2 * m.n_head + _attn_loop(arch, list(range(1, p + 1)))
    for resp in responses:
        for j in range(1, resp):
            expected += per_token + 2 * m.n_head + _attn_loop(arch, [p + j])
    assert m.rollout(p, responses) == expected
    extra_prefills = 2 * (p * per_token + 2 * m.n_head + _attn_loop(arch, list(range(1, p + 1))))
    assert m.rollout(p, responses, prefix_shared=False) == expected + extra_prefills
    assert rollout_flops(arch, [p, p], [responses, [2]]) == expected + m.rollout(p, [2])
    assert training_flops(arch, [p, 2], [r, 9]) == m.training(p, r) + m.training(2, 9)


def test_training_is_close_to_6n_per_token_for_short_sequences():
    # SmolLM2-135M's shape: for a short sequence attention is negligible, so training FLOPs per
    # token approach 6 * (matmul parameters) - the familiar rule of thumb.
    arch = _arch(layers=30, hidden=576, heads=9, kv=3, inter=1536, vocab=49152)
    m = ModelFlops.from_arch(arch)
    per_token = m.training(0, 16, head_on_all_tokens=True) / 16
    assert per_token == pytest.approx(6 * (m.n_body + m.n_head), rel=0.01)
    assert 130e6 < m.n_body + m.n_head < 140e6  # ~134M matmul parameters (tied embeddings)


def test_counter_accumulates_and_resumes():
    arch = _arch()
    counter = FlopsCounter.for_arch(arch)
    m = ModelFlops.from_arch(arch)
    counter.add_rollout([10, 12], [[3, 4], [5, 1]])
    counter.add_training([10, 10], [3, 4])  # one group dropped by dynamic sampling
    step1 = counter.end_step()
    roll = m.rollout(10, [3, 4]) + m.rollout(12, [5, 1])
    train = m.training(10, 3) + m.training(10, 4)
    assert step1["flops/rollout_step"] == roll and step1["flops/train_step"] == train
    assert step1["flops/total_cumulative"] == roll + train
    step2 = counter.end_step()
    assert step2["flops/train_step"] == 0 and step2["flops/train_cumulative"] == train
    resumed = FlopsCounter.for_arch(arch)
    resumed.load_state_dict(counter.state_dict())
    assert resumed.end_step()["flops/rollout_cumulative"] == roll


def test_scoring_passes_are_counted_in_the_total():
    """RLP's scoring passes: forward-only, output layer at one position, F(S, 1) each."""
    arch = _arch()
    counter, m = FlopsCounter.for_arch(arch), ModelFlops.from_arch(arch)
    counter.add_training([10], [3])
    assert counter.add_scoring([14, 9]) == m.forward(14, 1) + m.forward(9, 1)
    step = counter.end_step()
    assert step["flops/score_step"] == step["flops/score_cumulative"] == m.forward(14, 1) + m.forward(9, 1)
    assert step["flops/total_cumulative"] == m.training(10, 3) + step["flops/score_cumulative"]
    resumed = FlopsCounter.for_arch(arch)
    resumed.load_state_dict(counter.state_dict())
    assert resumed.score_cumulative == step["flops/score_cumulative"]
    resumed.load_state_dict({"train_cumulative": 1, "rollout_cumulative": 2})  # older checkpoint
    assert resumed.score_cumulative == 0
