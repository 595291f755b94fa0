"""HF -> Megatron -> HF conversion: name-table coverage, bit-exact round trips, error cases.

Megatron models are built in this process on a temporary 1-rank gloo group (created and torn
down by the converters or the fixture below); nothing is left initialised afterwards.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_rpt.checkpoint.discovery import read_metadata
from megatron_rpt.checkpoint.hf_to_megatron import convert_hf_to_megatron
from megatron_rpt.checkpoint.megatron_to_hf import convert_megatron_to_hf
from megatron_rpt.conversion.converter import WeightConverter
from megatron_rpt.conversion.hf_io import HFWeights
from megatron_rpt.errors import CheckpointError, InputError
from megatron_rpt.model.arch import read_arch
from megatron_rpt.model.manifest import write_manifest
from megatron_rpt.model.parameters import named_global_parameters
from megatron_rpt.testing.tiny_models import KINDS, VOCAB, hf_logits, save_tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _assert_same_tensors(dir_a: Path, dir_b: Path) -> None:
    a, b = load_file(dir_a / "model.safetensors"), load_file(dir_b / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("kind", KINDS)
def test_name_table_covers_every_hf_tensor(kind, tmp_path, fresh_groups):
    from megatron_rpt.model.build import build_model
    from megatron_rpt.model.config import ModelConfig, ParallelConfig

    hf_dir = save_tiny_model(kind, tmp_path / "hf")
    arch = read_arch(hf_dir)
    built = build_model(
        arch, ModelConfig(dtype="fp32", spec="local"), ParallelConfig(), fresh_groups, initialize=False
    )
    converter = WeightConverter(arch, built.vocab.padded)
    shapes = [(n, tuple(p.shape), p.dtype) for n, p in named_global_parameters(built.chunks)]
    plan = converter.hf_plan(shapes)  # raises for any Megatron parameter without a row
    weights = HFWeights(hf_dir)
    assert sorted(n for n, _, _ in plan) == sorted(weights.names())
    assert len(plan) == len(weights.names())  # no HF tensor produced twice
    for name, shape, _ in plan:
        assert shape == weights.shape(name), name


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_iter_hf_weights_streams_from_model_or_state_dict(dtype, tmp_path, fresh_groups):
    from megatron_rpt.checkpoint.loading import build_pretrained
    from megatron_rpt.conversion.converter import iter_hf_weights
    from megatron_rpt.model.config import ModelConfig, ParallelConfig

    src = save_tiny_model(
        "qwen2", tmp_path / "hf", dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    )
    cfg = ModelConfig(hf_path=str(src), dtype=dtype)
    built = build_pretrained(cfg, ParallelConfig(), fresh_groups)
    expected = load_file(src / "model.safetensors")
    params = {p.data_ptr() for p in built.chunks[0].parameters()}
    streamed = list(iter_hf_weights(built.chunks, built.arch, built.vocab.padded))
    assert sorted(n for n, _ in streamed) == sorted(expected)
    assert all(torch.equal(t, expected[n]) for n, t in streamed)
    # Identity-mapped tensors are the parameters themselves, not copies.
    assert dict(streamed)["model.layers.1.self_attn.o_proj.weight"].data_ptr() in params
    assert (
        dict(iter_hf_weights(built.chunks[0].state_dict(), built.arch, 256)).keys()
        == expected.keys()
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_bit_exact(kind, dtype, tmp_path, process_group):
    src = save_tiny_model(kind, tmp_path / "hf", dtype=dtype)
    ckpt = convert_hf_to_megatron(src, tmp_path / "mg")
    meta = read_metadata(ckpt)
    assert meta.dtype == {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    assert (meta.vocab_size, meta.padded_vocab_size) == (VOCAB, 256)
    assert (ckpt / "hf" / "config.json").is_file() and (
        ckpt / "hf" / "tokenizer_config.json"
    ).is_file()
    out = convert_megatron_to_hf(ckpt, tmp_path / "back")
    _assert_same_tensors(src, out)
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (src / "config.json").read_text()
    )
    for side in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / side).read_bytes() == (src / side).read_bytes()
    with safe_open(str(out / "model.safetensors"), "pt") as fh:  # padding rows never exported
        assert fh.get_slice("model.embed_tokens.weight").get_shape()[0] == VOCAB


def test_export_loads_in_transformers_with_identical_logits(tmp_path, process_group):
    src = save_tiny_model("qwen3", tmp_path / "hf")
    out = convert_megatron_to_hf(
        convert_hf_to_megatron(src, tmp_path / "mg"), tmp_path / "back", max_shard_bytes=40_000
    )
    assert (out / "model.safetensors.index.json").is_file()  # several shards
    tokens = torch.randint(0, VOCAB, (2, 12))
    assert torch.equal(hf_logits(out, tokens), hf_logits(src, tokens))


def test_dtype_cast_on_import(tmp_path, process_group):
    src = save_tiny_model("llama", tmp_path / "hf")
    ckpt = convert_hf_to_megatron(src, tmp_path / "mg", dtype="bf16")
    out = convert_megatron_to_hf(ckpt, tmp_path / "back")
    a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in b.values())
    assert all(torch.equal(a[n].to(torch.bfloat16), b[n]) for n in a)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_megatron_lm_directory(tmp_path, process_group):
    src = save_tiny_model("llama_tied", tmp_path / "hf")
    ckpt = convert_hf_to_megatron(src, tmp_path / "mg")
    mlm = tmp_path / "megatron_lm"
    shutil.copytree(ckpt / "model", mlm / "iter_0000010")
    (mlm / "latest_checkpointed_iteration.txt").write_text("10\n")
    with pytest.raises(CheckpointError, match="pass --hf-config DIR"):
        convert_megatron_to_hf(mlm, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    out = convert_megatron_to_hf(mlm, tmp_path / "out", hf_config=src)
    _assert_same_tensors(src, out)


# ----------------------------------------------------------------------------- errors


def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], list(
        parent.iterdir()
    )


def test_shape_mismatch_names_the_tensor(tmp_path, process_group):
    src = save_tiny_model("qwen2", tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 80}))
    with pytest.raises(
        CheckpointError,
        match=r"HF tensor 'model.layers.0.mlp.gate_proj.weight' "
        r"has shape \[96, 64\], expected \[80, 64\]",
    ):
        convert_hf_to_megatron(src, tmp_path / "mg")
    _no_leftovers(tmp_path, "mg")


def test_missing_and_unused_tensors_are_named(tmp_path, process_group):
    src = save_tiny_model("llama", tmp_path / "hf")
    tensors = load_file(src / "model.safetensors")
    extra = dict(tensors, **{"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)})
    save_file(extra, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError,
        match=r"tensors \['model.layers.0.self_attn.o_proj.bias'\] "
        r"are not used",
    ):
        convert_hf_to_megatron(src, tmp_path / "mg")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' is missing"
    ):
        convert_hf_to_megatron(src, tmp_path / "mg")
    (src / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=rf"{src}: no model.safetensors"):
        convert_hf_to_megatron(src, tmp_path / "mg")
    _no_leftovers(tmp_path, "mg")


def test_checkpoint_shapes_must_match_its_config(tmp_path, process_group):
    ckpt = convert_hf_to_megatron(save_tiny_model("qwen3", tmp_path / "hf"), tmp_path / "mg")
    cfg_file = ckpt / "hf" / "config.json"
    cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | {"intermediate_size": 80}))
    with pytest.raises(CheckpointError, match=r"hf/config.json: \d+ bytes, the manifest says"):
        convert_megatron_to_hf(ckpt, tmp_path / "back")  # the manifest notices the edit
    write_manifest(ckpt)  # a consistent checkpoint whose config disagrees with its weights
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'decoder.layers.mlp.linear_fc2.weight' has "
        r"shape \[2, 64, 96\] in the checkpoint",
    ):
        convert_megatron_to_hf(ckpt, tmp_path / "back")
    _no_leftovers(tmp_path, "back")


def test_fp16_weights_need_an_explicit_dtype(tmp_path, process_group):
    src = save_tiny_model("llama", tmp_path / "hf", dtype=torch.float16)
    with pytest.raises(CheckpointError, match=r"weights are \['float16'\]; pass --dtype"):
        convert_hf_to_megatron(src, tmp_path / "mg")
    assert read_metadata(convert_hf_to_megatron(src, tmp_path / "mg", dtype="fp32")).dtype == "fp32"


def test_existing_target_needs_overwrite(tmp_path, process_group):
    src = save_tiny_model("llama", tmp_path / "hf")
    (tmp_path / "mg").mkdir()
    with pytest.raises(InputError, match="output already exists"):
        convert_hf_to_megatron(src, tmp_path / "mg")
    ckpt = convert_hf_to_megatron(src, tmp_path / "mg", overwrite=True)
    assert read_metadata(ckpt).architecture == "LlamaForCausalLM"
    (tmp_path / "back").mkdir()
    with pytest.raises(InputError, match="output already exists"):
        convert_megatron_to_hf(ckpt, tmp_path / "back")


def test_failed_conversion_leaves_nothing_complete_looking(tmp_path, monkeypatch, process_group):
    from megatron_rpt.checkpoint import io as checkpoint_io
    from megatron_rpt.conversion import hf_io

    src = save_tiny_model("qwen2", tmp_path / "hf")
    ckpt = convert_hf_to_megatron(src, tmp_path / "mg")

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint_io, "copy_side_files", boom)  # after the model/ save
    with pytest.raises(
        CheckpointError, match=r"mg2: cannot save the checkpoint \(disk full \(simulated"
    ):
        convert_hf_to_megatron(src, tmp_path / "mg2")
    _no_leftovers(tmp_path, "mg2")
    monkeypatch.setattr(hf_io.SafetensorsShardWriter, "finish", boom)
    with pytest.raises(OSError, match="simulated"):
        convert_megatron_to_hf(ckpt, tmp_path / "back")
    _no_leftovers(tmp_path, "back")


def test_cli_reports_user_errors_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/convert_hf_to_megatron.py"),
            "--hf-dir",
            str(tmp_path),
            "--out-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert (
        f"error: {tmp_path}/config.json: unsupported architectures ['GPT2LMHeadModel']"
        in proc.stderr
    )
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_smollm2_round_trip_with_the_clis(tmp_path):
    from megatron_rpt.assets import smollm2_dir

    src = smollm2_dir()
    for tool, args in [
        (
            "convert_hf_to_megatron.py",
            ["--hf-dir", "embedded:smollm2", "--out-dir", str(tmp_path / "mg")],
        ),
        (
            "convert_megatron_to_hf.py",
            ["--megatron-dir", str(tmp_path / "mg"), "--out-dir", str(tmp_path / "hf")],
        ),
    ]:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tools" / tool), *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "hf"
    with (
        safe_open(str(src / "model.safetensors"), "pt") as a,
        safe_open(str(out / "model.safetensors"), "pt") as b,
    ):
        assert sorted(a.keys()) == sorted(b.keys())
        for name in a.keys():  # noqa: SIM118 - not a dict
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (src / "config.json").read_text()
    )
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
