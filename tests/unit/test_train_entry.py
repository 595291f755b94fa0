"""The training entry point and its launcher: configuration mistakes fail before any heavy
work with one line naming the setting; examples/pretrain_rpt.sh builds the right command."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rpt.errors import ConfigError
from megatron_rpt.testing.tiny_models import save_tiny_model
from megatron_rpt.train import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "model")  # 4 heads, 2 KV


def _args(model, tmp_path, *sets):
    base = [f"model.hf_path={model}", f"run.run_dir={tmp_path / 'run'}",
            f"data.prepared_dir={tmp_path / 'data'}", "data.corpus=embedded:champ"]  # fmt: skip
    return [x for s in (*base, *sets) for x in ("--set", s)]


@pytest.mark.parametrize(
    "sets, env, message",
    [
        (["train.stepz=2"], {}, "unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
        (["parallel.tensor_model_parallel_size=3"], {},
         "parallel.tensor_model_parallel_size=3 must divide the 4 attention heads"),
        (["parallel.tensor_model_parallel_size=4"], {},
         "parallel.tensor_model_parallel_size=4 must divide the 2 KV heads"),
        (["parallel.pipeline_model_parallel_size=3"], {},
         "parallel.pipeline_model_parallel_size=3 x virtual size 1 must divide the 2 layers"),
        (["rollout.n_samples=1"], {}, "rollout.n_samples=1: GRPO"),
        (["model.hf_path=/nonexistent/model"], {}, "model.hf_path: /nonexistent/model: model directory not found"),
        (["data.corpus=/nonexistent/corpus.jsonl"], {}, "data.corpus: /nonexistent/corpus.jsonl: corpus file not found"),
        (["parallel.tensor_model_parallel_size=2"], {"WORLD_SIZE": "3"},
         "= 2 must divide the number of processes (3)"),
        (["train.contexts_per_step=1", "rollout.n_samples=2"], {"WORLD_SIZE": "4"},
         "2 sequences per step is fewer than the 4 data-parallel ranks"),
        (["rollout.engine=sglang"], {}, "rollout.engine=sglang needs a CUDA GPU"),
        (["rollout.timeout_s=0"], {}, "rollout.timeout_s must be > 0"),
        (["train.objective=ntp", "loss.kl_coef=0.1"], {}, "train.objective=ntp is plain cross-entropy"),
        (["reward.name=dense"], {}, "reward.name=dense needs the policy's first-token"),
    ],
)  # fmt: skip
def test_bad_config_fails_before_heavy_work(tiny_model, tmp_path, monkeypatch, sets, env, message):
    import torch.distributed as dist

    if "sglang" in sets[0]:
        from megatron_rpt import capabilities

        if capabilities.have_sglang_runtime():
            pytest.skip("this machine can run SGLang")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as info:
        main(_args(tiny_model, tmp_path, *sets))
    assert message in str(info.value)
    assert not dist.is_initialized()  # nothing was started
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_resume_none_refuses_a_run_with_checkpoints(tiny_model, tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000001"
    (ckpt / "model").mkdir(parents=True)
    with pytest.raises(
        ConfigError, match="already has checkpoints .step_0000001.; use --resume auto"
    ):
        main(["--resume", "none", *_args(tiny_model, tmp_path)])
    # --resume auto never takes an unreadable checkpoints directory for a fresh start.
    with pytest.raises(ConfigError, match="no complete checkpoint to resume from"):
        main(_args(tiny_model, tmp_path))


def test_init_from_rejects_what_is_neither(tmp_path):
    from megatron_rpt.config import RPTConfig, apply_init_from

    with pytest.raises(ConfigError, match="--init-from .*neither an HF model directory"):
        apply_init_from(RPTConfig(), str(tmp_path))


def test_init_from_hf_dir_sets_hf_path(tmp_path):
    from megatron_rpt.config import RPTConfig, apply_init_from

    model = save_tiny_model("qwen2", tmp_path / "m")
    cfg = RPTConfig()
    cfg.model.megatron_checkpoint = "/old"
    apply_init_from(cfg, str(model))
    assert cfg.model.hf_path == str(model) and cfg.model.megatron_checkpoint is None


def test_help_config_lists_every_key(capsys):
    assert main(["--help-config", "--set", "train.steps=7"]) == 0
    out = capsys.readouterr().out
    assert "train.steps (int) = 7" in out
    for key in (
        "train.objective",
        "rollout.max_restarts",
        "log.wandb",
        "checkpoint.export_hf_at_end",
    ):
        assert key in out


def test_cli_prints_one_line_and_exits_2():
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_rpt.train", "--set", "train.stepz=1"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: unknown config key 'train.stepz' (did you mean 'train.steps'?)"
    )


@pytest.mark.parametrize(
    "recipe",
    ["smollm2_cpu/config.py:smollm2_cpu", "r1_distill_qwen_14b/config.py:r1_distill_qwen_14b"],
)
def test_recipes_validate(recipe):
    from megatron_rpt.config import build_config, resolve

    cfg = resolve(build_config(f"{ROOT}/examples/{recipe}"))
    assert cfg.rollout.n_samples == 8
    # The paper's T 0.8, except the CPU demo's documented 1.0 (its config.py says why).
    assert cfg.rollout.temperature == (1.0 if recipe.startswith("smollm2") else 0.8)
    assert cfg.loss.kl_coef == 0.0 and cfg.loss.entropy_coef == 0.0
    if recipe.startswith("r1_distill"):  # FP8 training, bf16 rollouts: TIS resolves to on
        assert cfg.precision.fp8 == "tensorwise" and cfg.loss.tis is True
    else:
        assert cfg.precision.fp8 == "none"


# ----------------------------------------------------------------------------- launcher


@pytest.fixture
def echo_python(tmp_path):
    """A stand-in interpreter: prints its arguments (and 0 GPUs when asked)."""
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\nif [ "$1" = "-c" ]; then echo 0; exit 0; fi\necho "ARGS $*"\n')
    stub.chmod(0o755)
    return stub


def _launch(echo_python, *args, **env):
    clean = {k: v for k, v in os.environ.items()
             if k not in {"RANK", "WORLD_SIZE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                          "NPROC_PER_NODE", "GPUS_PER_NODE"}}  # fmt: skip
    proc = subprocess.run(
        ["bash", str(ROOT / "examples/pretrain_rpt.sh"), *args],
        capture_output=True, text=True, timeout=60,
        env={**clean, "RPT_PYTHON": str(echo_python), **env},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("ARGS "))
    assert proc.stderr.startswith("+ ")  # the command is printed before it runs
    return line.split()[1:]


def test_launcher_default_runs_the_embedded_recipe_under_torchrun(echo_python):
    argv = _launch(echo_python, "--set", "train.steps=2")
    assert argv[:3] == ["-m", "torch.distributed.run", "--nnodes"]
    assert "--standalone" in argv and argv[argv.index("--nproc-per-node") + 1] == "1"
    tail = argv[argv.index("megatron_rpt.train") + 1 :]
    assert tail == ["--recipe", f"{ROOT}/examples/smollm2_cpu/config.py:smollm2_cpu",
                    "--set", "train.steps=2"]  # fmt: skip


def test_launcher_multi_node(echo_python):
    argv = _launch(echo_python, "--recipe", "r.py:f", NNODES="2", NODE_RANK="1",
                   MASTER_ADDR="node0", MASTER_PORT="6000", GPUS_PER_NODE="8")  # fmt: skip
    opts = dict(zip(argv[2:12:2], argv[3:13:2], strict=True))
    assert opts == {"--nnodes": "2", "--nproc-per-node": "8", "--node-rank": "1",
                    "--master-addr": "node0", "--master-port": "6000"}  # fmt: skip
    assert argv[-3:] == ["megatron_rpt.train", "--recipe", "r.py:f"]
    assert "--standalone" not in argv


def test_launcher_under_torchrun_execs_the_entry_point(echo_python):
    argv = _launch(echo_python, "--recipe", "r.py:f", "--set", "a=b", RANK="3", NPROC_PER_NODE="4")
    assert argv == ["-m", "megatron_rpt.train", "--recipe", "r.py:f", "--set", "a=b"]


def test_entry_point_trains_the_resolved_config_of_build_config(tiny_model, tmp_path, monkeypatch):
    """The entry point, the tools and the tests share ``config.build_config``; the entry point
    resolves its result once and trains (and writes to config.yaml) exactly that."""
    import megatron_rpt.config as config_mod
    from megatron_rpt import preflight
    from megatron_rpt.trainer import loop

    built, trained = [], []
    real_build = config_mod.build_config

    def build(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    def run_training(cfg, groups, **kwargs):
        trained.append(cfg)
        return loop.TrainResult(0, None, None)

    monkeypatch.setattr(config_mod, "build_config", build)
    monkeypatch.setattr(preflight, "ensure_prepared", lambda data, hf_dir: None)
    monkeypatch.setattr(loop, "run_training", run_training)
    main(_args(tiny_model, tmp_path, "model.dtype=bf16", "train.steps=1"))
    assert len(built) == 1 and len(trained) == 1
    assert trained[0] == config_mod.resolve(built[0]) != built[0]
    assert trained[0].model.dtype == "bfloat16" and trained[0].loss.tis is not None
