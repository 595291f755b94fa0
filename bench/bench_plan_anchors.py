"""The planner (megatron_rpt/planning) against published runs: predicted / published ratios.

    python bench/bench_plan_anchors.py

Anchors (numbers as their authors published them; the assumptions we add are printed):

1. A dense ~27B model, one 8-GPU H200 node, colocated RL (Miles' Qwen3.8-27B dense example):
   256 sequences of up to 8k tokens per step; rollout 307 s, training 415 s (of which 100 s
   reference log-probs and 33 s actor log-probs: two extra forward passes), weight sync 2.5 s
   (eight TP1 engines of 53 GB, trainer TP4), 478 generated tokens per GPU-second.
2. Megatron pretraining of Llama-3-8B in FP8 on H100: 744 model TFLOP/s per GPU and 14,451
   tokens per GPU-second at 8k sequence length (checks the FLOP counter's tokens-per-FLOP).
3. R1-Distill-Qwen-14B colocated weight sync on 8 H100 (trainer TP2): 1.6 s.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_rpt.config import RPTConfig  # noqa: E402
from megatron_rpt.model.arch import arch_from_dict  # noqa: E402
from megatron_rpt.model.flops import ModelFlops  # noqa: E402
from megatron_rpt.planning import ClusterSpec, PlanAssumptions, plan_run  # noqa: E402
from megatron_rpt.planning.cluster import PRESETS  # noqa: E402


def _arch(hidden, layers, heads, kv, inter, vocab, tied=False, head_dim=None, qk_norm=False):
    cfg = {
        "architectures": ["Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM"],
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "intermediate_size": inter, "vocab_size": vocab,
        "tie_word_embeddings": tied, "max_position_embeddings": 131072,
    }  # fmt: skip
    if head_dim:
        cfg["head_dim"] = head_dim
    return arch_from_dict(cfg)


# Assumption: the 27B hybrid (gated-DeltaNet + attention layers) as a dense Qwen3-style model
# of the same size (Qwen3-32B's layer shape, 52 layers: 26.9B parameters, 53.8 GB in bf16).
DENSE_27B = _arch(5120, 52, 64, 8, 25600, 151936, head_dim=128, qk_norm=True)
LLAMA3_8B = _arch(4096, 32, 32, 8, 14336, 128256)
QWEN_14B = _arch(5120, 48, 40, 8, 13824, 152064)


def miles_27b() -> list[tuple[str, float, float]]:
    """Anchor 1: predicted vs published seconds per phase."""
    cfg = RPTConfig()
    cfg.model.dtype, cfg.optimizer.use_distributed_optimizer = "bf16", True
    cfg.parallel.tensor_model_parallel_size = 4
    cfg.rollout.dtype, cfg.rollout.max_new_tokens, cfg.rollout.n_samples = "bfloat16", 8192, 1
    cfg.rollout.sglang.mem_fraction_static = 0.7
    cfg.train.contexts_per_step, cfg.train.micro_batch_layout = 256, "packed"
    cfg.data.context_tokens = 256  # assumption: short math prompts (+ 256 template tokens)
    setattr(cfg.rollout, "gpus_per_engine", 1)  # eight TP1 engines  # noqa: B010
    # Mean response from the published throughput: 478 tok/GPU/s x 8 GPUs x 307 s / 256.
    mean_fraction = 478 * 8 * 307 / 256 / 8192
    assume = PlanAssumptions(
        mfu=0.35, extra_forward_passes=2, mean_response_fraction=mean_fraction,
        engine_tokens_per_s_per_gpu=1500.0, engine_stream_tokens_per_s=60.0,
    )  # fmt: skip
    cluster = ClusterSpec(nodes=1, **PRESETS["h200"])
    plan = plan_run(cfg, DENSE_27B, cluster, assume)
    t = plan.time
    return [
        ("27B rollout s", t.rollout_s, 307.0),
        ("27B training s (incl. 2 extra forwards)", t.train_s, 415.0),
        ("27B weight sync s", t.sync_s, 2.5),
    ]


def megatron_8b() -> list[tuple[str, float, float]]:
    """Anchor 2: tokens per GPU-second at the published model TFLOP/s."""
    seq = 8192
    per_token = ModelFlops.from_arch(LLAMA3_8B).training(seq, 0, head_on_all_tokens=True) / seq
    return [("Llama-3-8B tok/GPU/s at 744 TFLOP/s", 744e12 / per_token, 14451.0)]


def qwen14b_sync() -> list[tuple[str, float, float]]:
    """Anchor 3: colocated sync of the 14B model on one node."""
    cfg = RPTConfig()
    cfg.parallel.tensor_model_parallel_size = 2
    cfg.rollout.dtype = "bfloat16"
    plan = plan_run(cfg, QWEN_14B, ClusterSpec(nodes=1, **PRESETS["h100"]))
    return [("14B weight sync s", plan.time.sync_s, 1.6)]


def main() -> None:
    """Print the side-by-side table and the assumptions the anchors imply."""
    rows = miles_27b() + megatron_8b() + qwen14b_sync()
    width = max(len(r[0]) for r in rows)
    print(f"{'quantity':<{width}}  {'planner':>10}  {'published':>10}  {'ratio':>6}")  # noqa: T201
    for name, got, ref in rows:
        print(f"{name:<{width}}  {got:>10.1f}  {ref:>10.1f}  {got / ref:>6.2f}")  # noqa: T201
    train = rows[1]
    print(f"implied by anchor 1: RL training-phase MFU {0.35 * train[1] / train[2]:.2f}, "  # noqa: T201
          f"engine throughput 478 tok/GPU/s, sync efficiency {0.1 * rows[2][1] / rows[2][2]:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
