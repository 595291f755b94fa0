"""Layer specs: Transformer Engine on GPU machines that have it, Megatron-Core's local modules
otherwise, chosen by ``ModelConfig.spec`` (auto | local | te) and logged.

* ``te``: Megatron's ``get_gpt_layer_with_transformer_engine_spec`` (fused layernorm+linear,
  TE attention; required for FP8). Needs a GPU and an importable Transformer Engine
  (``capabilities.have_te()``); asking for it without them is a ConfigError, never a silent
  fallback.
* ``local``: Megatron's ``get_gpt_layer_local_spec`` with RMSNorm, and its core attention
  swapped for ``SDPACoreAttention`` (torch SDPA; see sdpa_attention.py for the masking
  contract). Runs on CPU and GPU.
* ``auto``: ``te`` when available, else ``local``.

Both specs give identical checkpoint keys: the local spec maps ``input_layernorm`` /
``pre_mlp_layernorm`` to TE's fused ``linear_qkv.layer_norm_weight`` /
``linear_fc1.layer_norm_weight`` names in its sharded state dict, so a checkpoint written with
one spec loads with the other. Module parameter *names* differ; conversion/mappings.py lists
both.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from megatron_rpt import capabilities
from megatron_rpt.errors import ConfigError
from megatron_rpt.model.arch import ArchSpec

logger = logging.getLogger(__name__)


class LayerSpec(NamedTuple):
    """A Megatron ``ModuleSpec`` for one transformer layer and the name of its backend."""

    spec: object
    name: str


def resolve_spec_name(choice: str) -> str:
    """'auto' -> 'te' or 'local'; 'te' without TE raises ConfigError naming model.spec."""
    if choice not in ("auto", "local", "te"):
        raise ConfigError(f"model.spec: {choice!r} is not one of ['auto', 'local', 'te']")
    have_te = capabilities.have_te()
    if choice == "te" and not have_te:
        raise ConfigError(
            "model.spec=te, but Transformer Engine is not usable here "
            f"(cuda={capabilities.have_cuda()}); use model.spec=local or auto"
        )
    name = choice if choice != "auto" else ("te" if have_te else "local")
    return name


def layer_spec(choice: str, arch: ArchSpec) -> LayerSpec:
    """The transformer-layer spec for ``arch`` with backend ``choice`` (logged)."""
    name = resolve_spec_name(choice)
    spec = te_layer_spec(arch) if name == "te" else local_layer_spec(arch)
    logger.info(
        "layer spec: %s (model.spec=%s, transformer_engine=%s)",
        name,
        choice,
        capabilities.have_te(),
    )
    return LayerSpec(spec=spec, name=name)


def local_layer_spec(arch: ArchSpec) -> object:
    """Megatron-Core local modules + RMSNorm + SDPA core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_rpt.model.sdpa_attention import SDPACoreAttention

    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=arch.qk_norm)
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def te_layer_spec(arch: ArchSpec) -> object:
    """Megatron-Core's Transformer Engine spec (GPU only)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
