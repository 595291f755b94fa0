"""Bad HF directories and output paths: one CheckpointError/InputError naming the file, no output."""

import json
import os
import shutil

import pytest

from megatron_rpt.checkpoint.hf_to_megatron import convert_hf_to_megatron
from megatron_rpt.conversion.hf_io import HFWeights, copy_side_files
from megatron_rpt.errors import CheckpointError, InputError
from megatron_rpt.testing.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def clean_hf(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("hf") / "hf")


@pytest.fixture
def hf(clean_hf, tmp_path):
    return shutil.copytree(clean_hf, tmp_path / "hf")


def _header_len(path):
    return int.from_bytes(path.read_bytes()[:8], "little")


@pytest.mark.parametrize(
    "change",
    [
        lambda p: os.truncate(p, p.stat().st_size // 2),  # incomplete data
        lambda p: p.write_bytes(b""),  # header too small
        lambda p: p.write_bytes((2**40).to_bytes(8, "little") + p.read_bytes()[8:]),  # too large
        lambda p: p.write_bytes(p.read_bytes()[:8] + b"\xff\xfe" + p.read_bytes()[10:]),  # UTF-8
    ],
)
def test_broken_safetensors_names_the_file(hf, change):
    change(hf / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors"):
        HFWeights(hf)


def test_index_may_not_point_outside_the_model_directory(hf, tmp_path):
    shutil.move(hf / "model.safetensors", tmp_path / "elsewhere.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "elsewhere.safetensors"), framework="pt") as fh:
        weight_map = {k: "../elsewhere.safetensors" for k in fh.keys()}  # noqa: SIM118
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"not plain file names inside"):
        HFWeights(hf)


def test_side_file_links_out_of_the_directory_are_refused(hf, tmp_path):
    secret = tmp_path / "private.txt"
    secret.write_text("secret")
    (hf / "notes.txt").symlink_to(secret)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError, match=r"notes.txt: a link to .*outside the model dir"):
        copy_side_files(hf, out)
    assert not (out / "notes.txt").exists()


def test_output_that_contains_the_input_is_refused_even_with_overwrite(hf, tmp_path):
    for out in (hf, hf.parent):
        with pytest.raises(InputError, match="contains the input --hf-dir"):
            convert_hf_to_megatron(hf, out, overwrite=True)
    assert (hf / "model.safetensors").is_file()


def test_num_attention_heads_zero_is_one_error(hf, tmp_path):
    cfg = json.loads((hf / "config.json").read_text())
    cfg["num_attention_heads"] = 0
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="num_attention_heads=0 must be a positive integer"):
        convert_hf_to_megatron(hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_broken_tokenizer_json_fails_at_conversion(hf, tmp_path):
    (hf / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tokenizer.json: not valid JSON"):
        convert_hf_to_megatron(hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()
