"""The planner's trainer-memory estimate (planning/memory.py) against measured CPU peaks.

Each run builds a model in fresh gloo processes, runs two training steps (the optimizer
allocates its state during the first) and measures the peak of the resident anonymous memory
during the second, above what it was before the model was built (tests/helpers/memory_probe.py);
the planner estimates the same run from the architecture, the layout and the micro-batch
sizes the trainer chose, for the rank's pipeline stage. fp32 on CPU: 4-byte parameters and
activations, Adam state 8 bytes per parameter (sharded with the distributed optimizer).

Models: a widened tiny qwen3 (4 layers, H 512, vocabulary 16k) and a SmolLM2-135M-shaped
llama (30 layers, H 576, 9 / 3 heads, MLP 1536, vocabulary 49152, tied), random weights.
Layouts: TP1, TP2 + sequence parallelism, PP2, DP2 + distributed optimizer, full recompute
(tiny); TP1 and PP2 + full recompute (SmolLM2-sized).
Target: |estimate - measured| <= 15 % of measured, on every rank. Several minutes on 2 cores.
"""

import pytest

from megatron_rpt.testing.distributed import run_distributed
from megatron_rpt.testing.tiny_models import save_tiny_model

pytestmark = pytest.mark.slow

TOLERANCE = 0.15
WIDE_TINY = {"hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8,
             "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 16384,
             "max_position_embeddings": 2048}  # fmt: skip
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 2048,
           "tie_word_embeddings": True}  # fmt: skip
TINY_BATCH = dict(vocab=16384, num_groups=4, prompt_lens=(200, 300), group_sizes=(2, 4),
                  response_lens=(60, 120), seed=3)  # fmt: skip
SMOL_BATCH = dict(vocab=49152, num_groups=2, prompt_lens=(100, 150), group_sizes=(2, 3),
                  response_lens=(30, 60), seed=4)  # fmt: skip


def _layout(**kw):
    base = dict(tp=1, pp=1, sequence_parallel=False, recompute="none", dtype="fp32",
                distributed_optimizer=False, budget=1024, micro_batch_layout="packed")  # fmt: skip
    return base | kw


RUNS = {
    # name: (model, world size, layout, batch)
    "tiny_tp1": ("tiny", 1, _layout(), TINY_BATCH),
    "tiny_tp2_sp": ("tiny", 2, _layout(tp=2, sequence_parallel=True), TINY_BATCH),
    "tiny_pp2": ("tiny", 2, _layout(pp=2), TINY_BATCH),
    "tiny_dp2_distopt": ("tiny", 2, _layout(distributed_optimizer=True), TINY_BATCH),
    "tiny_tp1_full_recompute": ("tiny", 1, _layout(recompute="full"), TINY_BATCH),
    "smollm2_tp1": ("smollm2", 1, _layout(budget=512), SMOL_BATCH),
    # SmolLM2's 9 query / 3 KV heads do not split over TP=2: pipeline stages instead.
    "smollm2_pp2_full_recompute": (
        "smollm2", 2, _layout(pp=2, recompute="full", budget=512), SMOL_BATCH,
    ),  # fmt: skip
}


def _measure(rank, world_size, hf_dir, layout, batch):
    from tests.helpers.memory_probe import measure_train_step

    return measure_train_step(rank, world_size, hf_dir, layout, batch)


def _estimate(hf_dir, layout, world, measured):
    from megatron_rpt.model.arch import read_arch
    from megatron_rpt.planning.memory import TrainerShape, stage_memories

    tp, pp = layout["tp"], layout["pp"]
    shape = TrainerShape(
        tp=tp,
        pp=pp,
        dp=world // (tp * pp),
        sequence_parallel=layout["sequence_parallel"],
        param_bytes=4,
        distributed_optimizer=layout["distributed_optimizer"],
        recompute=layout["recompute"],
        microbatch_tokens=measured["microbatch_tokens"],
        response_tokens=measured["response_tokens"],
        microbatches=measured["microbatches"],
    )
    stages = stage_memories(read_arch(hf_dir), shape, measured["padded_vocab"])
    # This rank's stage: the first or the last (PP2 here), or the only one.
    return stages[min(measured["pp_rank"], len(stages) - 1)].total


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan_memory")
    return {
        "tiny": str(save_tiny_model("qwen3", root / "tiny", num_layers=4,
                                    config_overrides=WIDE_TINY)),
        "smollm2": str(save_tiny_model("llama_tied", root / "smollm2", num_layers=30,
                                       config_overrides=SMOLLM2)),
    }  # fmt: skip


@pytest.mark.parametrize("name", list(RUNS))
def test_memory_estimate_within_15_percent_of_measured(model_dirs, name):
    model, world, layout, batch = RUNS[name]
    hf_dir = model_dirs[model]
    ranks = run_distributed(_measure, world, args=(hf_dir, layout, batch), timeout=1200)
    for rank, measured in enumerate(ranks):
        estimate = _estimate(hf_dir, layout, world, measured)
        error = (estimate - measured["measured"]) / measured["measured"]
        print(f"{name} rank {rank}: measured {measured['measured'] / 2**20:.1f} MiB, "
              f"estimate {estimate / 2**20:.1f} MiB, error {error:+.1%}")  # fmt: skip
        assert abs(error) <= TOLERANCE, (name, rank, measured, estimate)
