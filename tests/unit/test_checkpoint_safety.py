"""Hostile and corrupt checkpoint files: refused by name, nothing from them executed.

Each malicious file carries a pickle whose ``__reduce__`` would create a marker file; every
test asserts the marker was never created. Checkpoints come from the HF -> Megatron converter
on a tiny random model (one process, gloo).
"""

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_rpt.checkpoint.discovery import find_checkpoint
from megatron_rpt.checkpoint.hf_to_megatron import convert_hf_to_megatron
from megatron_rpt.checkpoint.megatron_to_hf import convert_megatron_to_hf
from megatron_rpt.errors import CheckpointError
from megatron_rpt.model.manifest import MANIFEST_FILE, verify_manifest, write_manifest
from megatron_rpt.model.safe_load import check_dcp_metadata, clean_message, load_tensor_file
from megatron_rpt.testing.tiny_models import save_tiny_model

ROOT = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def clean_ckpt(tmp_path_factory):
    from megatron_rpt.distributed import single_process_group

    tmp = tmp_path_factory.mktemp("ckpt")
    hf = save_tiny_model("llama", tmp / "hf")
    with single_process_group():
        return convert_hf_to_megatron(hf, tmp / "mg")


@pytest.fixture
def ckpt(clean_ckpt, tmp_path):
    return Path(shutil.copytree(clean_ckpt, tmp_path / "ckpt"))


def _export(ckpt: Path, out: Path) -> None:
    from megatron_rpt.distributed import single_process_group

    with single_process_group():
        convert_megatron_to_hf(ckpt, out)


def test_save_writes_a_manifest_that_verifies(ckpt):
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    listed = set(manifest["files"])
    assert {"metadata.json", "model/.metadata", "model/common.pt"} <= listed
    assert any(name.endswith(".distcp") for name in listed)
    assert verify_manifest(ckpt) is True


def test_malicious_metadata_is_refused_before_anything_runs(ckpt, tmp_path):
    marker = tmp_path / "pwned"
    (ckpt / "model" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    write_manifest(ckpt)  # a crafted checkpoint carries a matching manifest
    with pytest.raises(CheckpointError, match=r"\.metadata: refusing to load class posix\.system"):
        check_dcp_metadata(ckpt / "model")
    with pytest.raises(CheckpointError, match=r"model/\.metadata: refusing to load class"):
        _export(ckpt, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_malicious_metadata_through_the_export_cli(ckpt, tmp_path):
    marker = tmp_path / "pwned"
    (ckpt / "model" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    write_manifest(ckpt)
    proc = subprocess.run(
        [sys.executable, "tools/convert_megatron_to_hf.py", "--megatron-dir", str(ckpt),
         "--out-dir", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "refusing to load class posix.system" in last
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_malicious_byte_entry_is_refused(ckpt, tmp_path):
    """A checkpoint whose _extra_state entries unpickle into code is refused by name."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_rpt.checkpoint.io import model_sharded_state_dict
    from megatron_rpt.checkpoint.loading import resolve_source
    from megatron_rpt.distributed import (
        initialize_model_parallel,
        seed_model_parallel,
        single_process_group,
    )
    from megatron_rpt.model.build import build_model
    from megatron_rpt.model.config import ModelConfig, ParallelConfig

    marker = tmp_path / "pwned"
    with single_process_group():
        groups = initialize_model_parallel(1, 1)
        seed_model_parallel(0, groups)
        source = resolve_source(ModelConfig(megatron_checkpoint=str(ckpt)), None)
        built = build_model(
            source.arch, ModelConfig(dtype="fp32", spec="local"), ParallelConfig(), groups,
            padded_vocab=source.padded_vocab, initialize=False,
        )  # fmt: skip
        sharded = model_sharded_state_dict(built.chunks)
        objects = [v for v in nested_values(sharded) if isinstance(v, ShardedObject)]
        assert objects, "the model has no byte entries to poison"
        for obj in objects:
            obj.data = _Payload(marker)
        shutil.rmtree(ckpt / "model")
        (ckpt / "model").mkdir()
        dist_checkpointing.save(sharded, str(ckpt / "model"))
    write_manifest(ckpt)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"_extra_state.*is not plain data"):
        _export(ckpt, tmp_path / "out")
    assert not marker.exists()


def test_malicious_tensor_file_is_refused_without_unsafe_advice(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "rank_00000.pt"
    torch.save({"python": _Payload(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        load_tensor_file(path)
    assert str(path) in str(err.value) and "posix.system" in str(err.value)
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_truncated_tensor_file_is_one_line(tmp_path):
    path = tmp_path / "rank_00000.pt"
    torch.save({"torch": torch.get_rng_state()}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="rank_00000.pt: cannot read") as err:
        load_tensor_file(path)
    assert "\n" not in str(err.value)


def test_clean_message_drops_the_weights_only_advice():
    buf = io.BytesIO()
    torch.save([_Payload(Path("/nonexistent/marker"))], buf)
    buf.seek(0)
    with pytest.raises(Exception) as err:
        torch.load(buf, weights_only=True)
    assert "weights_only" in str(err.value)  # torch's own message has the advice
    cleaned = clean_message(err.value)
    assert "weights_only" not in cleaned and "trusted source" not in cleaned
    assert "posix.system" in cleaned


@pytest.mark.parametrize("part", ["model/__0_0.distcp", "model/common.pt", "hf/config.json"])
def test_flipped_byte_is_reported_by_name_on_export(ckpt, tmp_path, part):
    path = ckpt / part
    data = bytearray(path.read_bytes())
    data[int(len(data) * 0.7)] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{part}: checksum mismatch"):
        _export(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_file_is_reported_by_name(ckpt, tmp_path):
    shard = next((ckpt / "model").glob("*.distcp"))
    os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: \d+ bytes, the manifest says"):
        _export(ckpt, tmp_path / "out")


def test_checkpoint_without_manifest_still_loads(ckpt, tmp_path, caplog):
    (ckpt / MANIFEST_FILE).unlink()
    _export(ckpt, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file()
    assert any("cannot be verified" in r.message for r in caplog.records)


def test_latest_must_name_a_checkpoint_inside_the_directory(ckpt, tmp_path):
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    shutil.copytree(ckpt, run / "step_0000001")
    (run / "latest").write_text("../../ckpt\n")
    with pytest.raises(CheckpointError, match="must name a checkpoint directory inside"):
        find_checkpoint(run)
    (run / "latest").write_text("step_0000001\n")
    assert find_checkpoint(run).root == run / "step_0000001"
