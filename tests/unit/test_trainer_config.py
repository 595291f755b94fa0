"""Trainer configs: paper defaults, validation rules that name the field, checkpoint helpers."""

from pathlib import Path

import pytest

from megatron_rpt.checkpoint import discovery
from megatron_rpt.config import RPTConfig, build_config, validate
from megatron_rpt.config_utils import apply_overrides, field_docs
from megatron_rpt.errors import ConfigError
from megatron_rpt.trainer.checkpoint import checkpoint_name, is_save_step, prune_checkpoints
from megatron_rpt.trainer.config import CheckpointConfig, OptimizerConfig, TrainConfig


def test_paper_defaults_and_docs():
    cfg = RPTConfig()
    assert (cfg.optimizer.lr, cfg.optimizer.lr_schedule) == (1e-6, "constant")
    assert (cfg.optimizer.adam_beta1, cfg.optimizer.adam_beta2) == (0.9, 0.999)
    assert cfg.optimizer.weight_decay == 0.01 and cfg.optimizer.clip_grad == 1.0
    assert cfg.optimizer.use_distributed_optimizer and cfg.train.contexts_per_step == 256
    assert cfg.train.micro_batch_layout == "auto" and cfg.checkpoint.keep_last == 3
    for cls in (OptimizerConfig, TrainConfig, CheckpointConfig):
        import dataclasses

        assert set(field_docs(cls)) == {f.name for f in dataclasses.fields(cls)}, cls


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=-1", "optimizer.lr must be >= 0"),
        ("optimizer.min_lr=1", "optimizer.min_lr must be in [0, optimizer.lr]"),
        ("optimizer.lr_warmup_steps=2000", "optimizer.lr_warmup_steps must be < train.steps"),
        ("optimizer.adam_beta2=1", "optimizer.adam_beta2 must be in [0, 1)"),
        ("optimizer.clip_grad=-1", "optimizer.clip_grad must be >= 0"),
        (
            "optimizer.optimizer=sgd",
            "optimizer.optimizer=sgd needs optimizer.use_distributed_optimizer=false",
        ),
        ("train.max_tokens_per_microbatch=1", "train.max_tokens_per_microbatch must be >= 2"),
        ("train.micro_batch_layout=ragged", "'ragged' is not one of"),
        ("checkpoint.keep_last=-1", "checkpoint.keep_last must be >= 0"),
        ("checkpoint.async_save=true", "checkpoint.async_save is not implemented"),
        ("rollout.temperature=0", "rollout.temperature=0 (greedy) cannot be trained on"),
    ],
)
def test_validation_names_the_field(override, message):
    with pytest.raises(ConfigError) as exc:
        build_config(overrides=[override])
    assert message in str(exc.value)


def test_valid_overrides_pass():
    cfg = apply_overrides(
        RPTConfig(),
        [
            "optimizer.optimizer=sgd",
            "optimizer.use_distributed_optimizer=false",
            "optimizer.lr_schedule=cosine",
            "train.micro_batch_layout=padded",
        ],
    )
    assert validate(cfg).optimizer.lr_schedule == "cosine"


def test_save_steps_and_names():
    cfg = CheckpointConfig(interval=0)
    assert [s for s in range(1, 6) if is_save_step(s, cfg, 5)] == [5]
    assert checkpoint_name(1234) == "step_0001234"


def _fake_checkpoint(path: Path) -> Path:
    (path / discovery.MODEL_DIR).mkdir(parents=True)
    meta = discovery.CheckpointMetadata("LlamaForCausalLM", "fp32", 250, 256, 1, 1, "test")
    (path / discovery.METADATA_FILE).write_text(__import__("json").dumps(meta.to_json()))
    return path


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (1, 5, 10, 20):
        _fake_checkpoint(tmp_path / checkpoint_name(step))
    (tmp_path / "step_0000030").mkdir()  # incomplete (no metadata.json): never counted/deleted
    (tmp_path / ".step_0000040.tmp-99").mkdir()  # a crashed save: hidden, ignored
    removed = prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["step_0000001", "step_0000005"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".step_0000040.tmp-99",
        "step_0000010",
        "step_0000020",
        "step_0000030",
    ]
    assert prune_checkpoints(tmp_path, 0) == []
    # find_checkpoint never picks a hidden temporary or an incomplete directory.
    assert discovery.find_checkpoint(tmp_path).root.name == "step_0000020"
