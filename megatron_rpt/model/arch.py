"""Read an HF ``config.json`` into a normalized architecture description (``ArchSpec``).

Only the dense decoder families megatron_rpt converts and builds are accepted:

* ``llama`` (``LlamaForCausalLM``; SmolLM2 is one, with tied embeddings),
* ``qwen2`` (``Qwen2ForCausalLM``; bias on Q/K/V; the DeepSeek-R1-Distill-Qwen family),
* ``qwen3`` (``Qwen3ForCausalLM``; RMSNorm on each query/key head, explicit ``head_dim``).

The file is read as plain JSON (no transformers import), so both transformers-4 configs
(``rope_theta`` / ``rope_scaling`` / ``torch_dtype``) and transformers-5 configs
(``rope_parameters`` / ``dtype``) are understood. Anything the Megatron model cannot
reproduce exactly (another activation, sliding-window layers, an unknown RoPE scaling, biases
Megatron has no slot for) raises ``CheckpointError`` naming the field and the file, instead of
building a model that silently computes something else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from megatron_rpt.errors import CheckpointError

Family = Literal["llama", "qwen2", "qwen3"]

# HF class name -> family. model_type is the fallback when `architectures` is absent.
_ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_MODEL_TYPES: dict[str, Family] = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# Megatron's RotaryEmbedding implements Llama-3 frequency scaling with these constants
# hard-coded (megatron/core/models/common/embeddings/rotary_pos_embedding.py:_apply_scaling);
# only HF configs with the same values can be reproduced.
_MEGATRON_LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass(frozen=True)
class ArchSpec:
    """Everything about an HF causal LM that model building and weight conversion need."""

    family: Family
    hf_architecture: str
    """HF class name written back into exported configs, e.g. 'LlamaForCausalLM'."""
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    """True vocabulary size (rows of embed_tokens); Megatron pads beyond it."""
    rms_norm_eps: float
    rope_theta: float
    rope_scaling_factor: float | None
    """Llama-3 style RoPE frequency scaling factor, or None for plain RoPE."""
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    hf_dtype: str | None
    """Weight dtype the config declares ('float32', 'bfloat16', ...), if any."""

    @property
    def heads_per_group(self) -> int:
        """Query heads sharing one KV head (GQA ratio)."""
        return self.num_attention_heads // self.num_kv_heads


def read_arch(path: str | Path) -> ArchSpec:
    """Parse ``path`` (an HF model dir or its config.json) into an ArchSpec.

    >>> import json, tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
    ...                                                 "model_type": "gpt2"}))
    >>> read_arch(d)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    megatron_rpt.errors.CheckpointError: .../config.json: unsupported architectures ['GPT2LMHeadModel'] (model_type 'gpt2'); supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
    """
    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: HF config.json not found")
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError) as exc:  # ValueError: invalid JSON or not UTF-8 text
        raise CheckpointError(f"{file}: cannot read HF config: {exc}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: HF config must be a JSON object")
    return arch_from_dict(cfg, source=str(file))


def arch_from_dict(cfg: dict[str, Any], *, source: str = "config.json") -> ArchSpec:
    """Normalize an HF config dict; errors name ``source`` and the offending field."""
    family, hf_arch = _family(cfg, source)

    def need(key: str) -> int:
        if cfg.get(key) is None:
            raise CheckpointError(f"{source}: required field '{key}' is missing")
        return _positive_int(cfg[key], key, source)

    hidden = need("hidden_size")
    heads = need("num_attention_heads")
    kv_heads = _positive_int(cfg.get("num_key_value_heads") or heads, "num_key_value_heads", source)
    head_dim = _positive_int(cfg.get("head_dim") or hidden // heads, "head_dim", source)
    if heads % kv_heads:
        raise CheckpointError(
            f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
    _reject_true(cfg, source, "mlp_bias")
    if family in ("llama", "qwen3"):
        # HF puts this bias on q/k/v *and* o_proj; Megatron can only add it to QKV.
        _reject_true(cfg, source, "attention_bias")
    if family in ("qwen2", "qwen3"):
        _reject_true(cfg, source, "use_sliding_window")
        layer_types = cfg.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            raise CheckpointError(
                f"{source}: layer_types other than 'full_attention' are not supported"
            )
    theta, factor = _rope(cfg, source)
    return ArchSpec(
        family=family,
        hf_architecture=hf_arch,
        hidden_size=hidden,
        num_layers=need("num_hidden_layers"),
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=need("intermediate_size"),
        vocab_size=need("vocab_size"),
        rms_norm_eps=_positive_float(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps", source),
        rope_theta=theta,
        rope_scaling_factor=factor,
        max_position_embeddings=_int(
            cfg.get("max_position_embeddings") or 4096, "max_position_embeddings", source
        ),  # fmt: skip
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        hf_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
    )


def _family(cfg: dict[str, Any], source: str) -> tuple[Family, str]:
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    supported = ", ".join(_ARCHITECTURES)
    if archs:
        if len(archs) != 1 or archs[0] not in _ARCHITECTURES:
            raise CheckpointError(
                f"{source}: unsupported architectures {archs} (model_type {model_type!r}); "
                f"supported: {supported}"
            )
        return _ARCHITECTURES[archs[0]], archs[0]
    if model_type in _MODEL_TYPES:
        family = _MODEL_TYPES[model_type]
        return family, next(k for k, v in _ARCHITECTURES.items() if v == family)
    raise CheckpointError(
        f"{source}: unsupported model_type {model_type!r} (no 'architectures' field); "
        f"supported: {supported}"
    )


def _reject_true(cfg: dict[str, Any], source: str, key: str) -> None:
    if cfg.get(key):
        raise CheckpointError(f"{source}: {key}=true is not supported for this architecture")


def _int(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise CheckpointError(f"{source}: {key}={value!r} is not an integer")
    return int(value)


def _positive_int(value: Any, key: str, source: str) -> int:
    out = _int(value, key, source)
    if out <= 0:
        raise CheckpointError(f"{source}: {key}={value!r} must be a positive integer")
    return out


def _positive_float(value: Any, key: str, source: str) -> float:
    import math

    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CheckpointError(f"{source}: {key}={value!r} is not a finite number")
    if value <= 0:
        raise CheckpointError(f"{source}: {key}={value!r} must be positive")
    return float(value)


# Keys of a RoPE parameter dict this module understands; any other key would be ignored,
# so it is refused.
_ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", *_MEGATRON_LLAMA3_ROPE}


def _rope_params(cfg: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
    """The RoPE dict and the field it came from; refuses disagreeing or malformed fields."""
    params, scaling = cfg.get("rope_parameters"), cfg.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise CheckpointError(f"{source}: rope_scaling={scaling!r} must be an object or null")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type dict
        params = params["full_attention"]
        if not isinstance(params, dict):
            raise CheckpointError(
                f"{source}: rope_parameters.full_attention={params!r} must be an object"
            )
    if params is None:
        params = dict(scaling or {})
        if "rope_theta" in cfg:
            params.setdefault("rope_theta", cfg["rope_theta"])
        return params, "rope_scaling"
    if not isinstance(params, dict):
        raise CheckpointError(f"{source}: rope_parameters={params!r} must be an object")

    def kind(d: dict[str, Any]) -> Any:
        return d.get("rope_type", d.get("type", "default"))

    if scaling and kind(scaling) != kind(params):
        raise CheckpointError(
            f"{source}: rope_scaling.rope_type={kind(scaling)!r} and rope_parameters.rope_type="
            f"{kind(params)!r} disagree; keep one of the two fields"
        )
    return params, "rope_parameters"


def _rope(cfg: dict[str, Any], source: str) -> tuple[float, float | None]:
    """(rope_theta, llama3 scaling factor or None) from either config generation."""
    params, field = _rope_params(cfg, source)
    unknown = sorted(set(params) - _ROPE_KEYS)
    if unknown:
        raise CheckpointError(f"{source}: {field} keys {unknown} are not supported")
    theta = _positive_float(
        params.get("rope_theta", cfg.get("rope_theta", 10000.0)), f"{field}.rope_theta", source
    )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        for key, value in _MEGATRON_LLAMA3_ROPE.items():
            got = params.get(key, value)
            if _positive_float(got, f"{field}.{key}", source) != value:
                raise CheckpointError(
                    f"{source}: {field}.{key}={got} is not supported "
                    f"(Megatron's llama3 RoPE scaling fixes it to {value})"
                )
        if "factor" not in params:
            raise CheckpointError(f"{source}: {field}.factor is required for rope_type 'llama3'")
        return theta, _positive_float(params["factor"], f"{field}.factor", source)
    raise CheckpointError(f"{source}: {field}.rope_type={rope_type!r} is not supported")
