"""find_checkpoint: our layout, run checkpoint dirs, Megatron-LM trackers, refusals."""

import json

import pytest

from megatron_rpt.checkpoint.discovery import (
    FORMAT,
    CheckpointMetadata,
    find_checkpoint,
    read_metadata,
)
from megatron_rpt.errors import CheckpointError


def _fake_ckpt(path, **meta):
    (path / "model").mkdir(parents=True)
    (path / "hf").mkdir()
    data = CheckpointMetadata(
        architecture="LlamaForCausalLM",
        dtype="bf16",
        vocab_size=250,
        padded_vocab_size=256,
        tensor_model_parallel_size=2,
        pipeline_model_parallel_size=1,
        source="x",
    ).to_json()
    (path / "metadata.json").write_text(json.dumps(data | meta))
    return path


def _fake_dist(path):
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    (path / ".metadata").write_bytes(b"")
    return path


def test_checkpoint_dir(tmp_path):
    ckpt = find_checkpoint(_fake_ckpt(tmp_path / "c"))
    assert ckpt.kind == "megatron_rpt" and ckpt.model_dir == tmp_path / "c" / "model"
    assert ckpt.hf_dir == tmp_path / "c" / "hf" and ckpt.metadata.padded_vocab_size == 256


def test_run_checkpoints_dir_picks_latest(tmp_path):
    run = tmp_path / "checkpoints"
    for step in (100, 20, 300):
        _fake_ckpt(run / f"step_{step:d}")
    (run / ".step_400.tmp-123").mkdir()  # an unfinished atomic save is ignored
    (run / "step_500").mkdir()  # incomplete: no metadata.json
    assert find_checkpoint(run).root == run / "step_300"
    (run / "latest").write_text("step_20\n")
    assert find_checkpoint(run).root == run / "step_20"
    (run / "latest").write_text("step_500\n")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        find_checkpoint(run)


def test_megatron_lm_tracker(tmp_path):
    _fake_dist(tmp_path / "iter_0000042")
    _fake_dist(tmp_path / "release")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("42\n")
    ckpt = find_checkpoint(tmp_path)
    assert ckpt.kind == "megatron_lm" and ckpt.model_dir == tmp_path / "iter_0000042"
    assert ckpt.hf_dir is None and ckpt.metadata is None
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    assert find_checkpoint(tmp_path).model_dir == tmp_path / "release"
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(CheckpointError, match="names iter_0000007, which does not exist"):
        find_checkpoint(tmp_path)


def test_legacy_megatron_lm_format_is_refused(tmp_path):
    (tmp_path / "iter_0000001" / "mp_rank_00").mkdir(parents=True)
    (tmp_path / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("1")
    with pytest.raises(CheckpointError, match="legacy Megatron-LM checkpoint format"):
        find_checkpoint(tmp_path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        find_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        find_checkpoint(tmp_path)


def test_metadata_validation(tmp_path):
    path = _fake_ckpt(tmp_path / "c", format="something-else")
    with pytest.raises(CheckpointError, match="not a megatron_rpt checkpoint"):
        read_metadata(path)
    path = _fake_ckpt(tmp_path / "d", format=FORMAT, format_version=99)
    with pytest.raises(CheckpointError, match="format_version 99 is newer"):
        read_metadata(path)
