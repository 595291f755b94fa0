"""FP8 rollout weights in the weight sync (one process, tiny models, 32x32 blocks so that the
64-wide test models tile; SGLang uses 128).

* the plan lists every quantized weight in FP8 followed by its ``weight_scale_inv``, with the
  names, shapes and dtypes of the FP8 checkpoint an SGLang engine would be launched from;
* a sync into the HF engine through ``DequantizingEngine``: the engine ends up holding exactly
  ``dequantize(quantize(trainer weight))`` for quantized weights and the trainer's own tensors
  for the rest, and the probe sees the FP8 log-prob gap (non-zero, small);
* the FP8 stream survives SGLang's flattened per-dtype buckets bit-exactly;
* the FP8 checkpoint writer (and its CLI), SGLang's block-divisibility rule, config rules.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_rpt.conversion.hf_io import HFWeights
from megatron_rpt.errors import ConfigError, InputError
from megatron_rpt.testing.tiny_models import VOCAB, save_tiny_model
from megatron_rpt.weight_sync import WeightSync, WeightSyncConfig
from megatron_rpt.weight_sync.fp8 import (
    FP8_DTYPE,
    BlockFP8,
    DequantizingEngine,
    check_servable,
    dequantize_blockwise,
)
from megatron_rpt.weight_sync.fp8_checkpoint import write_fp8_checkpoint
from tests.helpers.updates import perturb_parameters

SPEC = BlockFP8(block_size=32)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return save_tiny_model("qwen2", tmp_path_factory.mktemp("qwen2"))


def _pretrained(hf_dir, groups, dtype="fp32"):
    from megatron_rpt.checkpoint.loading import build_pretrained
    from megatron_rpt.model.config import ModelConfig, ParallelConfig

    return build_pretrained(ModelConfig(hf_path=str(hf_dir), dtype=dtype), ParallelConfig(), groups)


def _hf_engine(hf_dir):
    from transformers import AutoModelForCausalLM

    from megatron_rpt.rollout.hf_engine import HFEngine
    from tests.helpers.rollout_helpers import smollm2_tokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return HFEngine(model, smollm2_tokenizer())


def test_plan_matches_the_fp8_checkpoint_sglang_would_load(qwen2, groups, tmp_path):
    from megatron_rpt.rollout.sglang_engine import hf_manifest
    from megatron_rpt.weight_sync import build_plan

    built = _pretrained(qwen2, groups, "bf16")
    plain = build_plan(built, groups, WeightSyncConfig(bucket_bytes=20_000))
    plan = build_plan(built, groups, WeightSyncConfig(bucket_bytes=20_000), SPEC)
    assert plan.digest() != plain.digest() and plan.hf_bytes < plain.hf_bytes
    out = write_fp8_checkpoint(qwen2, tmp_path / "fp8", SPEC)
    files = HFWeights(out)
    want = {n: (files.shape(n), files.dtype(n)) for n in files.names()}
    got = {o.name: (o.shape, o.dtype) for o in plan.hf_tensors()}
    # the checkpoint keeps the HF file's dtype (fp32) for what is not quantized; the sync pushes bf16
    assert {n: s for n, (s, _) in got.items()} == {n: s for n, (s, _) in want.items()}
    assert {n for n, (_, d) in got.items() if d == FP8_DTYPE} == {
        n for n, (_, d) in want.items() if d == FP8_DTYPE
    }
    assert hf_manifest(out) == {n: s for n, (s, _) in want.items()}  # the adapter's name check
    names = [o.name for o in plan.hf_tensors()]
    for i, name in enumerate(names):  # every scale right after its weight
        if name.endswith("weight_scale_inv"):
            assert names[i - 1] == name.removesuffix("_scale_inv")
    assert sum(n.endswith("_scale_inv") for n in names) == 7 * 2  # 7 linear weights x 2 layers
    assert "blockwise FP8 (32x32" in plan.summary()


def test_sync_into_hf_engine_holds_the_fp8_rounded_weights(qwen2, groups):
    from megatron_rpt.conversion.converter import iter_hf_weights

    built = _pretrained(qwen2, groups)
    perturb_parameters(built.chunks, built.arch, built.vocab.padded, 0, 1, seed=3)
    engine = DequantizingEngine(_hf_engine(qwen2), SPEC, torch.float32)
    cfg = WeightSyncConfig(bucket_bytes=30_000, verify="probe")
    m = WeightSync(built, groups, engine, cfg, quantization=SPEC)(version=1)
    assert m.fp8_tensors == 14 and m.buckets > 1 and engine.weight_version == 1
    # The probe sees the FP8 rounding: not the fp32 1e-5 level, still far below broken weights.
    assert m.probe_mean_abs_diff is not None and 1e-5 < m.probe_mean_abs_diff < 0.05
    state = dict(engine.model.named_parameters())
    for name, ref in iter_hf_weights(built.chunks, built.arch, built.vocab.padded):
        if SPEC.quantizes(name, ref.shape):
            q, s = SPEC.quantize(name, ref)
            assert torch.equal(state[name], dequantize_blockwise(q[1], s[1], 32)), name
            assert not torch.equal(state[name], ref), name
        else:
            assert torch.equal(state[name], ref), name
    with pytest.raises(NotImplementedError, match="verify=probe"):
        engine.weight_checksums(["model.norm.weight"])


def test_fp8_stream_survives_sglang_flattened_buckets():
    from tests.helpers.rollout_helpers import require_sglang_protocol

    require_sglang_protocol()
    from megatron_rpt.rollout import sglang_protocol as proto

    g = torch.Generator().manual_seed(0)
    stream = [("model.norm.weight", torch.randn(64, generator=g).bfloat16())]
    for i in range(3):
        name = f"model.layers.{i}.mlp.down_proj.weight"
        stream += SPEC.quantize(name, torch.randn(64, 96, generator=g))
    got = []
    for group in proto.iter_dtype_buckets(stream, 10_000):
        assert len({t.dtype for _, t in group}) == 1
        bucket = proto.flatten_bucket(group)
        body = proto.tensor_bucket_request(
            bucket, tp_size=1, flush_cache=False, weight_version=None
        )
        got += proto.decode_tensor_bucket(body["serialized_named_tensors"][0])
    assert sorted(n for n, _ in got) == sorted(n for n, _ in stream)
    ref = dict(stream)
    for name, t in got:
        assert t.dtype == ref[name].dtype and torch.equal(
            t.view(torch.uint8), ref[name].view(torch.uint8)
        )


def test_fp8_checkpoint_files_config_and_cli(qwen2, tmp_path):
    out = write_fp8_checkpoint(qwen2, tmp_path / "fp8", SPEC)
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [32, 32]
    assert (
        "lm_head" in qc["modules_to_not_convert"]
        and "model.embed_tokens" in qc["modules_to_not_convert"]
    )
    assert (out / "tokenizer.json").exists() or any(
        p.name.startswith("tokenizer") for p in out.iterdir()
    )
    original = load_file(qwen2 / "model.safetensors")
    written = load_file(out / "model.safetensors")
    for name, tensor in original.items():
        if SPEC.quantizes(name, tensor.shape):
            (_, q), (scale_name, s) = SPEC.quantize(name, tensor)
            assert written[name].dtype == FP8_DTYPE
            assert torch.equal(written[name].view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(written[scale_name], s)
        else:
            assert torch.equal(written[name], tensor)
    with pytest.raises(InputError, match="already exists"):
        write_fp8_checkpoint(qwen2, out, SPEC)

    from tools.convert_hf_to_fp8 import main

    assert (
        main(["--hf-dir", str(qwen2), "--out-dir", str(out), "--block-size", "32", "--overwrite"])
        == 0
    )
    assert load_file(out / "model.safetensors").keys() == written.keys()
    with pytest.raises(ConfigError, match="multiples of 128"):  # 64-wide layers: not servable
        main(["--hf-dir", str(qwen2), "--out-dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_sglang_block_divisibility_rule():
    smollm2 = {  # SmolLM2-135M: 9 query heads, 3 KV heads of 64 -> k/v_proj have 192 rows
        "model.layers.0.self_attn.q_proj.weight": (576, 576),
        "model.layers.0.self_attn.k_proj.weight": (192, 576),
        "model.layers.0.self_attn.v_proj.weight": (192, 576),
        "model.layers.0.self_attn.o_proj.weight": (576, 576),
        "model.layers.0.mlp.gate_proj.weight": (1536, 576),
        "model.layers.0.mlp.down_proj.weight": (576, 1536),
        "model.embed_tokens.weight": (49152, 576),
    }
    with pytest.raises(
        ConfigError, match=r"k_proj.weight rows 192 / TP 1.*serve this model in bf16"
    ) as err:
        check_servable(smollm2, BlockFP8())
    # q_proj too (576 = 4.5 x 128); gate_proj (1536) is fine, o/down_proj only matter at TP > 1
    assert "3 weight(s)" in str(err.value) and "q_proj.weight rows 576" in str(err.value)
    llama2_7b = {
        "model.layers.0.self_attn.k_proj.weight": (4096, 4096),
        "model.layers.0.self_attn.o_proj.weight": (4096, 4096),
        "model.layers.0.mlp.down_proj.weight": (4096, 11008),  # 86 blocks of 128 columns
    }
    check_servable(llama2_7b, BlockFP8(), engine_tp=2)
    with pytest.raises(ConfigError, match=r"1 weight\(s\).*down_proj.weight columns 11008 / TP 4"):
        check_servable(llama2_7b, BlockFP8(), engine_tp=4)


def test_config_refuses_fingerprints_of_dequantized_fp8_weights():
    from megatron_rpt.config import RPTConfig, validate
    from megatron_rpt.config_utils import apply_overrides

    with pytest.raises(ConfigError, match="weight_sync.verify=checksum cannot check FP8"):
        validate(
            apply_overrides(
                RPTConfig(), ["precision.rollout_fp8=true", "weight_sync.verify=checksum"]
            )
        )
    cfg = validate(apply_overrides(RPTConfig(), ["precision.rollout_fp8=true"]))
    from megatron_rpt.weight_sync.fp8 import rollout_quantization

    assert rollout_quantization(cfg.precision) == BlockFP8(128, False)
    assert rollout_quantization(RPTConfig().precision) is None
    assert VOCAB == 250
