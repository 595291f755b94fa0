"""The HF <-> Megatron-Core name table: one declarative table per architecture.

Each row maps one Megatron parameter (``*`` = global layer index) to the HF tensor(s) it is
made of and names the transform between them (conversion/transforms.py). The same table
serves offline conversion, loading HF weights into a sharded model, and (later) live weight
sync to the rollout engine.

Megatron names are the *canonical* ones: no ``module.`` wrapper prefixes, global layer
indices. Norm weights appear under both the local-spec name (``input_layernorm.weight``) and
the Transformer Engine name (``linear_qkv.layer_norm_weight``): a model has exactly one of
them, and both map to the same HF tensor.

>>> from megatron_rpt.model.arch import arch_from_dict
>>> arch = arch_from_dict({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 8,
...     "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 16,
...     "vocab_size": 10})
>>> row, layer = find_mapping(mapping_table(arch), "decoder.layers.0.self_attention.linear_qkv.bias")
>>> row.transform, hf_names(row, layer)
('qkv', ('model.layers.0.self_attn.q_proj.bias', 'model.layers.0.self_attn.k_proj.bias', 'model.layers.0.self_attn.v_proj.bias'))
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_rpt.model.arch import ArchSpec


@dataclass(frozen=True)
class ParamMapping:
    """One row: Megatron parameter pattern <-> HF tensor pattern(s), through ``transform``."""

    megatron: str
    hf: tuple[str, ...]
    transform: str


L, H = "decoder.layers.*.", "model.layers.*."

_COMMON: tuple[ParamMapping, ...] = (
    ParamMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    ParamMapping("decoder.final_layernorm.weight", ("model.norm.weight",), "identity"),
    # local spec / Transformer Engine spec names of the two per-layer norms
    ParamMapping(L + "input_layernorm.weight", (H + "input_layernorm.weight",), "identity"),
    ParamMapping(
        L + "self_attention.linear_qkv.layer_norm_weight",
        (H + "input_layernorm.weight",),
        "identity",
    ),
    ParamMapping(
        L + "pre_mlp_layernorm.weight", (H + "post_attention_layernorm.weight",), "identity"
    ),
    ParamMapping(
        L + "mlp.linear_fc1.layer_norm_weight", (H + "post_attention_layernorm.weight",), "identity"
    ),
    ParamMapping(
        L + "self_attention.linear_qkv.weight",
        (
            H + "self_attn.q_proj.weight",
            H + "self_attn.k_proj.weight",
            H + "self_attn.v_proj.weight",
        ),
        "qkv",
    ),
    ParamMapping(
        L + "self_attention.linear_proj.weight", (H + "self_attn.o_proj.weight",), "identity"
    ),
    ParamMapping(
        L + "mlp.linear_fc1.weight",
        (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"),
        "gated_mlp",
    ),
    ParamMapping(L + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",), "identity"),
)

_UNTIED_HEAD = (ParamMapping("output_layer.weight", ("lm_head.weight",), "vocab"),)
_TIED_HEAD = (ParamMapping("output_layer.weight", ("model.embed_tokens.weight",), "tied_vocab"),)

_QKV_BIAS = (
    ParamMapping(
        L + "self_attention.linear_qkv.bias",
        (H + "self_attn.q_proj.bias", H + "self_attn.k_proj.bias", H + "self_attn.v_proj.bias"),
        "qkv",
    ),
)
_QK_NORM = (
    ParamMapping(
        L + "self_attention.q_layernorm.weight", (H + "self_attn.q_norm.weight",), "identity"
    ),
    ParamMapping(
        L + "self_attention.k_layernorm.weight", (H + "self_attn.k_norm.weight",), "identity"
    ),
)

_FAMILY_EXTRAS: dict[str, tuple[ParamMapping, ...]] = {
    "llama": (),
    "qwen2": _QKV_BIAS,
    "qwen3": _QK_NORM,
}


def mapping_table(arch: ArchSpec) -> tuple[ParamMapping, ...]:
    """The table for ``arch``'s family and its embedding tying."""
    head = _TIED_HEAD if arch.tie_word_embeddings else _UNTIED_HEAD
    return _COMMON + _FAMILY_EXTRAS[arch.family] + head


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(pattern).replace(r"\*", r"(\d+)") + "$")


def find_mapping(
    table: tuple[ParamMapping, ...], megatron_name: str
) -> tuple[ParamMapping, int | None]:
    """The row matching a canonical Megatron name, and its layer index; KeyError if none."""
    for row in table:
        match = _compile(row.megatron).match(megatron_name)
        if match:
            return row, (int(match.group(1)) if match.groups() else None)
    raise KeyError(megatron_name)


def hf_names(row: ParamMapping, layer: int | None) -> tuple[str, ...]:
    """The row's HF names with the layer index filled in."""
    if layer is None:
        return row.hf
    return tuple(name.replace("*", str(layer)) for name in row.hf)


def megatron_name(row: ParamMapping, layer: int | None) -> str:
    """The row's Megatron name with the layer index filled in."""
    return row.megatron if layer is None else row.megatron.replace("*", str(layer))
