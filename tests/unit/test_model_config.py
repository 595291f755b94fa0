"""ModelConfig / ParallelConfig validation, the one TransformerConfig builder, spec selection."""

import re

import pytest
import torch

from megatron_rpt import capabilities
from megatron_rpt.config import RPTConfig, validate
from megatron_rpt.config_utils import apply_overrides
from megatron_rpt.errors import ConfigError
from megatron_rpt.model.arch import arch_from_dict
from megatron_rpt.model.build import build_transformer_config, check_parallel_fit
from megatron_rpt.model.config import ModelConfig, ParallelConfig
from megatron_rpt.model.specs import layer_spec, resolve_spec_name
from megatron_rpt.testing.tiny_models import tiny_config_dict


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.transformer_overrides={attention_dropot: 0.1}"],
            "'attention_dropot' is not a TransformerConfig field (did you mean 'attention_dropout'?)",
        ),
        (["model.transformer_overrides={num_layers: 3}"], "'num_layers' is set from the HF"),
        (
            ["parallel.virtual_pipeline_model_parallel_size=2"],
            "needs parallel.pipeline_model_parallel_size >= 2",
        ),
        (
            ["parallel.tensor_model_parallel_size=0"],
            "parallel.tensor_model_parallel_size must be >= 1",
        ),
        (
            ["model.make_vocab_size_divisible_by=0"],
            "model.make_vocab_size_divisible_by must be >= 1",
        ),
        (["model.dtype=fp16"], "model.dtype: 'fp16' is not one of"),
    ],
)
def test_validation_names_the_field(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(apply_overrides(RPTConfig(), overrides))


def test_defaults_validate():
    cfg = validate(
        apply_overrides(RPTConfig(), ["model.transformer_overrides={attention_dropout: 0.1}"])
    )
    assert cfg.model.transformer_overrides == {"attention_dropout": 0.1}


def test_parallel_fit_needs_the_architecture():
    arch = arch_from_dict(tiny_config_dict("llama"))  # 4 heads, 2 KV heads, 2 layers
    check_parallel_fit(
        arch, ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    )
    with pytest.raises(
        ConfigError, match="tensor_model_parallel_size=4 must divide the 2 KV heads"
    ):
        check_parallel_fit(arch, ParallelConfig(tensor_model_parallel_size=4))
    with pytest.raises(
        ConfigError, match="pipeline_model_parallel_size=2 x virtual size 2 must divide"
    ):
        check_parallel_fit(
            arch,
            ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
        )


def test_transformer_config_reflects_the_architecture(monkeypatch):
    qwen3 = arch_from_dict(tiny_config_dict("qwen3"))
    cfg = build_transformer_config(
        qwen3,
        ModelConfig(dtype="bf16", transformer_overrides={"attention_dropout": 0.25}),
        ParallelConfig(),
    )
    assert (cfg.num_query_groups, cfg.kv_channels, cfg.qk_layernorm, cfg.add_qkv_bias) == (
        2,
        32,
        True,
        False,
    )
    assert cfg.normalization == "RMSNorm" and cfg.gated_linear_unit and not cfg.add_bias_linear
    assert cfg.params_dtype == torch.bfloat16 and cfg.bf16 and cfg.attention_dropout == 0.25
    assert cfg.use_cpu_initialization == (not capabilities.have_cuda())
    qwen2 = build_transformer_config(
        arch_from_dict(tiny_config_dict("qwen2")), ModelConfig(), ParallelConfig()
    )
    assert qwen2.add_qkv_bias and not qwen2.qk_layernorm
    recompute = ModelConfig(recompute_granularity="full")
    full = build_transformer_config(qwen3, recompute, ParallelConfig())
    assert (full.recompute_granularity, full.recompute_method) == ("full", "uniform")
    sp = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    assert build_transformer_config(qwen3, ModelConfig(), sp).sequence_parallel
    if not capabilities.have_cuda():  # the CUDA RNG patch makes recompute run on CPU
        monkeypatch.setenv("MEGATRON_RPT_CPU_PATCHES", "device,sync,mode,typestr,optckpt")
        with pytest.raises(ConfigError, match="needs the 'rng' patch"):
            build_transformer_config(qwen3, recompute, ParallelConfig())
        cp = ParallelConfig(context_parallel_size=2)
        with pytest.raises(ConfigError, match="context_parallel_size=2 needs Transformer"):
            build_transformer_config(qwen3, ModelConfig(), cp)


@pytest.mark.skipif(capabilities.have_te(), reason="machine has Transformer Engine")
def test_spec_selection_without_te():
    arch = arch_from_dict(tiny_config_dict("qwen3"))
    assert resolve_spec_name("auto") == "local"
    spec = layer_spec("auto", arch)
    assert spec.name == "local"
    core = spec.spec.submodules.self_attention.submodules.core_attention
    assert core.__name__ == "SDPACoreAttention"
    with pytest.raises(ConfigError, match="model.spec=te, but Transformer Engine is not usable"):
        layer_spec("te", arch)
