"""The planner (megatron_rpt/planning): parameter counts against real models, the direction of
every memory setting, the FLOP count against the project's counter, the fit verdict and the
GPU preflight's refusal naming the setting to change, and tools/plan_run.py."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rpt.config import RPTConfig
from megatron_rpt.errors import ConfigError
from megatron_rpt.model.arch import arch_from_dict, read_arch
from megatron_rpt.model.flops import FlopsCounter, ModelFlops
from megatron_rpt.planning import ClusterSpec, PlanAssumptions, check_fit, format_plan, plan_run
from megatron_rpt.planning.memory import ParamCounts, TrainerShape, trainer_memory
from megatron_rpt.planning.plan import micro_batching, workload
from megatron_rpt.planning.timing import train_flops

ROOT = Path(__file__).resolve().parents[2]
QWEN_14B = {  # DeepSeek-R1-Distill-Qwen-14B's config.json (the fields the planner reads)
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 5120,
    "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8,
    "intermediate_size": 13824, "vocab_size": 152064, "rope_theta": 1e6,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 131072,
}  # fmt: skip


def _recipe_14b() -> RPTConfig:
    import importlib.util

    path = ROOT / "examples/r1_distill_qwen_14b/config.py"
    spec = importlib.util.spec_from_file_location("recipe_14b", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.r1_distill_qwen_14b()


@pytest.fixture(scope="module")
def qwen14b_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen14b")
    (d / "config.json").write_text(json.dumps(QWEN_14B))
    return d


@pytest.mark.parametrize("kind", ["qwen3", "llama_tied", "qwen2"])
def test_parameter_count_equals_the_hf_model(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    from megatron_rpt.testing.tiny_models import save_tiny_model

    hf_dir = save_tiny_model(kind, tmp_path / kind)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert ParamCounts.from_arch(read_arch(hf_dir)).total == model.num_parameters()


def test_14b_has_14_8b_parameters_and_stages_split_them():
    arch = arch_from_dict(QWEN_14B)
    counts = ParamCounts.from_arch(arch)
    assert abs(counts.total / 1e9 - 14.77) < 0.01
    # TP4 x PP2: the 8 GPUs of one replica hold all matrices once (+ replicated norms).
    split = 4 * (counts.stage(4, 2, True, False) + counts.stage(4, 2, False, True))
    assert counts.total <= split <= counts.total + 8 * arch.num_layers * (2 * 5120)


def test_each_memory_setting_moves_memory_the_right_way():
    arch = arch_from_dict(QWEN_14B)
    base = TrainerShape(tp=4, pp=2, dp=4, microbatch_tokens=12288, microbatches=8)

    def total(**kw):
        return trainer_memory(arch, TrainerShape(**(base.__dict__ | kw)), 152064)

    ref = total()
    assert total(sequence_parallel=True).activations < ref.activations
    assert total(recompute="full").activations < total(sequence_parallel=True).activations
    assert total(cp=2).activations == pytest.approx(ref.activations / 2, rel=0.01)
    assert total(distributed_optimizer=False).optimizer == pytest.approx(4 * ref.optimizer, 1e-6)
    assert total(microbatch_tokens=6144).activations < ref.activations
    assert total(param_bytes=4).params == 2 * ref.params
    # Selective recompute only drops materialised attention scores.
    scores = total(score_segment_tokens=12288)
    assert total(score_segment_tokens=12288, recompute="selective").activations < scores.activations


def test_train_flops_equal_the_flop_counter_for_separate_sequences():
    cfg = RPTConfig()
    cfg.train.micro_batch_layout = "packed"
    cfg.train.contexts_per_step, cfg.rollout.n_samples = 3, 4
    arch = arch_from_dict(QWEN_14B)
    assume = PlanAssumptions(mean_response_fraction=0.25)
    work = workload(cfg, assume)
    counter = FlopsCounter.for_arch(arch)
    n = work.contexts * work.samples
    r = round(work.mean_response_tokens)
    expected = counter.add_training([work.prompt_tokens] * n, [r] * n)
    got = train_flops(
        ModelFlops.from_arch(arch), work, prompt_passes=work.samples, recompute=False, extra=0
    )
    assert got == expected
    # The shared-prefix layout computes each group's prompt fewer times.
    shared = train_flops(
        ModelFlops.from_arch(arch), work, prompt_passes=1, recompute=False, extra=0
    )
    assert shared < got


def test_micro_batching_follows_the_token_budget():
    cfg = _recipe_14b()
    work = workload(cfg, PlanAssumptions())
    assert work.prompt_tokens == 4096 and work.max_response_tokens == 8192
    mb = micro_batching(work, 16384, dp=4, mean=False)
    assert (mb.tokens, mb.response_tokens, mb.prompt_passes) == (12288, 8192, 8)
    assert mb.count == 256 * 8 // 4
    big = micro_batching(work, 4096 + 8 * 8192, dp=4, mean=False)
    assert (big.tokens, big.prompt_passes, big.count) == (4096 + 8 * 8192, 1, 64)


def test_14b_recipe_on_4_h100_nodes_fits_with_the_handoff_only():
    cfg = _recipe_14b()
    cluster = ClusterSpec(nodes=4, gpus_per_node=8, gpu_memory_gib=79.6)
    plan = plan_run(cfg, arch_from_dict(QWEN_14B), cluster)
    assert plan.fits and plan.peak_resident > plan.usable
    assert plan.engines == 8 and plan.gpus_per_engine == 4
    t = plan.time
    assert t.rollout_s > t.train_s > t.sync_s > 0
    table = format_plan(plan, cluster, PlanAssumptions())
    assert "fits (with the hand-off)" in table and "without the hand-off it does not fit" in table
    one = plan_run(cfg, arch_from_dict(QWEN_14B), cluster, engines=1)
    assert one.time.rollout_s > 4 * t.rollout_s  # 8x fewer GPUs generating


def test_a_plan_that_cannot_fit_names_the_setting():
    cfg = _recipe_14b()
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = 1, 1
    arch = arch_from_dict(QWEN_14B)
    plan = plan_run(cfg, arch, ClusterSpec(nodes=1, gpus_per_node=8, gpu_memory_gib=79.6))
    assert not plan.fits
    with pytest.raises(ConfigError, match="change model.recompute_granularity=full"):
        check_fit(plan)
    cfg.model.recompute_granularity = "full"
    cfg.parallel.tensor_model_parallel_size = 2
    plan = plan_run(cfg, arch, ClusterSpec(nodes=1, gpus_per_node=8, gpu_memory_gib=40))
    with pytest.raises(ConfigError, match="change parallel.sequence_parallel=true"):
        check_fit(plan)


def test_an_engine_without_room_for_one_group_is_refused():
    cfg = _recipe_14b()
    cfg.rollout.sglang.mem_fraction_static = 0.1  # 8 GiB: the weights alone take 6.9
    plan = plan_run(cfg, arch_from_dict(QWEN_14B), ClusterSpec(nodes=4, gpu_memory_gib=79.6))
    with pytest.raises(ConfigError, match="rollout.gpus_per_engine"):
        check_fit(plan)


def test_cluster_and_assumption_errors_name_the_field():
    cfg, arch = _recipe_14b(), arch_from_dict(QWEN_14B)
    with pytest.raises(ConfigError, match="cluster.nodes"):
        plan_run(cfg, arch, ClusterSpec(nodes=0))
    with pytest.raises(ConfigError, match="assumptions.mfu"):
        plan_run(cfg, arch, ClusterSpec(nodes=4), PlanAssumptions(mfu=1.5))
    with pytest.raises(ConfigError, match="must divide the 12 GPUs"):
        plan_run(cfg, arch, ClusterSpec(nodes=1, gpus_per_node=12))


def test_preflight_refuses_before_any_model_is_built(qwen14b_dir, monkeypatch):
    from megatron_rpt import preflight

    cfg = _recipe_14b()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    plan = preflight.check_memory(cfg, qwen14b_dir, 32, gpu_memory_gib=79.6)
    assert plan is not None and plan.fits
    with pytest.raises(ConfigError, match="does not fit in GPU memory.*change model.recompute"):
        preflight.check_memory(cfg, qwen14b_dir, 32, gpu_memory_gib=40)
    from megatron_rpt import capabilities

    if not capabilities.have_cuda():  # no GPU, no stated memory: nothing to check
        assert preflight.check_memory(cfg, qwen14b_dir, 32) is None


def test_the_training_entry_point_runs_the_memory_preflight(monkeypatch, tmp_path):
    """``megatron_rpt.train.main`` fails in the preflight, before torch.distributed starts."""
    from megatron_rpt import preflight, train

    calls = []

    def refuse(cfg, hf_dir, world):
        calls.append(world)
        raise ConfigError("this run does not fit in GPU memory: ...; change X")

    monkeypatch.setattr(preflight, "check_run", lambda cfg, world: tmp_path)
    monkeypatch.setattr(preflight, "check_memory", refuse)
    monkeypatch.setattr(train, "model_parallel", lambda cfg: pytest.fail("distributed started"))
    with pytest.raises(ConfigError, match="does not fit"):
        train.main(["--set", f"run.run_dir={tmp_path / 'run'}"])
    assert calls == [1]


def test_plan_run_tool_prints_the_table(qwen14b_dir):
    recipe = f"{ROOT}/examples/r1_distill_qwen_14b/config.py:r1_distill_qwen_14b"
    cmd = [sys.executable, str(ROOT / "tools/plan_run.py"), "--recipe", recipe, "--arch",
           str(qwen14b_dir), "--preset", "h100", "--nodes", "4", "--scale-nodes", "16,64",
           "--mfu", "0.4"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    assert "FLOPs at MFU 0.4" in out and "fits (with the hand-off)" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:2] in ("16", "64")]
    assert [r[0] for r in rows] == ["16", "64"]
    assert float(rows[1][-2]) < float(rows[0][-2])  # more nodes, shorter step
    small = subprocess.run([*cmd, "--gpu-memory-gib", "30", "--strict"], capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert small.returncode == 1 and "DOES NOT FIT: change" in small.stdout
    assert math.isfinite(float(rows[0][-2]))


def test_flop_counter_matches_megatrons_published_8b_throughput():
    """Llama-3-8B FP8 pretraining on H100: 744 model TFLOP/s per GPU = 14,451 tokens/s/GPU
    at 8k sequences; the counter's FLOPs per token reproduce that ratio to 1 %."""
    arch = arch_from_dict({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
        "vocab_size": 128256,
    })  # fmt: skip
    per_token = ModelFlops.from_arch(arch).training(8192, 0, head_on_all_tokens=True) / 8192
    assert 744e12 / per_token == pytest.approx(14451, rel=0.01)


def test_cpu_preflight_refuses_context_parallelism():
    from megatron_rpt import capabilities
    from megatron_rpt.preflight import check_context_parallel

    if capabilities.have_te():
        pytest.skip("machine has Transformer Engine")
    cfg = RPTConfig()
    cfg.parallel.context_parallel_size = 2
    with pytest.raises(ConfigError, match="context_parallel_size=2 needs Transformer Engine"):
        check_context_parallel(cfg)
