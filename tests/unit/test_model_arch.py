"""HF config.json -> ArchSpec: supported families, both config generations, clear refusals."""

import json

import pytest

from megatron_rpt.errors import CheckpointError
from megatron_rpt.model.arch import arch_from_dict, read_arch
from megatron_rpt.testing.tiny_models import tiny_config_dict


def test_families_and_their_features():
    llama = arch_from_dict(tiny_config_dict("llama_tied"))
    qwen2 = arch_from_dict(tiny_config_dict("qwen2"))
    qwen3 = arch_from_dict(tiny_config_dict("qwen3"))
    assert (llama.family, llama.tie_word_embeddings, llama.qkv_bias, llama.qk_norm) == (
        "llama",
        True,
        False,
        False,
    )
    assert (qwen2.family, qwen2.qkv_bias, qwen2.qk_norm) == ("qwen2", True, False)
    assert (qwen3.family, qwen3.qkv_bias, qwen3.qk_norm) == ("qwen3", False, True)
    assert llama.head_dim == 16 and qwen3.head_dim == 32  # explicit head_dim wins
    assert llama.num_kv_heads == 2 and llama.heads_per_group == 2
    assert llama.rope_theta == 5000.0 and llama.rope_scaling_factor is None


def test_transformers4_config_fields():
    cfg = tiny_config_dict("qwen2")
    del cfg["rope_parameters"]
    cfg.update(
        rope_theta=1e6,
        rope_scaling=None,
        torch_dtype="bfloat16",
        sliding_window=4096,
        use_sliding_window=False,
    )
    arch = arch_from_dict(cfg)
    assert arch.rope_theta == 1e6 and arch.hf_dtype == "bfloat16"


def test_llama3_rope_scaling_matches_megatron_constants():
    cfg = tiny_config_dict("llama")
    cfg["rope_parameters"] = {
        "rope_type": "llama3",
        "rope_theta": 5e5,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert arch_from_dict(cfg).rope_scaling_factor == 32.0
    cfg["rope_parameters"]["high_freq_factor"] = 2.0
    with pytest.raises(CheckpointError, match=r"rope_parameters.high_freq_factor=2.0"):
        arch_from_dict(cfg)


def test_model_type_fallback_when_architectures_missing():
    cfg = tiny_config_dict("qwen3")
    del cfg["architectures"]
    assert arch_from_dict(cfg).hf_architecture == "Qwen3ForCausalLM"


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"architectures": ["MistralForCausalLM"], "model_type": "mistral"},
            r"unsupported architectures \['MistralForCausalLM'\] \(model_type 'mistral'\)",
        ),
        ({"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
        ({"attention_bias": True}, r"attention_bias=true is not supported"),
        ({"mlp_bias": True}, r"mlp_bias=true is not supported"),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
            r"rope_parameters.rope_type='yarn' is not supported",
        ),
        (
            {"num_key_value_heads": 3},
            r"num_attention_heads=4 is not a multiple of num_key_value_heads=3",
        ),
        ({"intermediate_size": None}, r"required field 'intermediate_size' is missing"),
    ],
)
def test_unsupported_configs_name_the_field_and_file(tmp_path, change, message):
    cfg = tiny_config_dict("llama") | change
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"{tmp_path}/config.json: {message}"):
        read_arch(tmp_path)


def test_sliding_window_qwen_is_refused(tmp_path):
    cfg = tiny_config_dict("qwen2") | {"use_sliding_window": True}
    with pytest.raises(CheckpointError, match="use_sliding_window=true"):
        arch_from_dict(cfg)


def test_missing_or_broken_config_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=rf"{tmp_path}/config.json: HF config.json not found"):
        read_arch(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read HF config"):
        read_arch(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_attention_heads": 0}, "num_attention_heads=0 must be a positive integer"),
        ({"hidden_size": "abc"}, "hidden_size='abc' is not an integer"),
        ({"hidden_size": [64]}, r"hidden_size=\[64\] is not an integer"),
        ({"hidden_size": 64.5}, "hidden_size=64.5 is not an integer"),
        ({"num_hidden_layers": -2}, "num_hidden_layers=-2 must be a positive integer"),
        ({"vocab_size": 0}, "vocab_size=0 must be a positive integer"),
        ({"rms_norm_eps": "tiny"}, "rms_norm_eps='tiny' is not a finite number"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": "big"}}, "rope_theta='big'"),
        ({"rope_scaling": [1, 2]}, "rope_scaling=.* must be an object or null"),
        ({"rope_scaling": "linear"}, "rope_scaling='linear' must be an object or null"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type='yarn' and rope_parameters.rope_type='default' disagree"),
        ({"rope_scaling": {"rope_type": "llama3"}}, "disagree"),
        ({"rope_parameters": {"full_attention": 5}}, "rope_parameters.full_attention=5 must be an object"),
        ({"rope_parameters": {"rope_type": "default", "mscale": 1.0}}, r"rope_parameters keys \['mscale'\] are not supported"),
        ({"rope_parameters": {"rope_type": "llama3"}}, "rope_parameters.factor is required"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": "x"}}, "factor='x' is not a finite number"),
    ],
)  # fmt: skip
def test_malformed_fields_are_one_checkpoint_error(tmp_path, change, message):
    cfg = tiny_config_dict("llama")
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        read_arch(tmp_path)


def test_binary_config_is_one_error(tmp_path):
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(CheckpointError, match="config.json: cannot read HF config"):
        read_arch(tmp_path)
