"""Layer specs: Transformer Engine on GPU machines that have it, Megatron-Core's local modules
otherwise, chosen by ``ModelConfig.spec`` (auto | local | te) and logged.

* ``te``: Megatron's ``get_gpt_layer_with_transformer_engine_spec`` (fused layernorm+linear,
  TE attention; required for FP8), with its core attention subclassed to also run the
  shared-prefix layout (``te_shared_prefix_attention``; any other call goes to Megatron's
  ``TEDotProductAttention`` unchanged). Needs a GPU and an importable Transformer Engine
  (``capabilities.have_te()``); asking for it without them is a ConfigError, never a silent
  fallback.
* ``local``: Megatron's ``get_gpt_layer_local_spec`` with RMSNorm, and its core attention
  swapped for ``SDPACoreAttention`` (torch SDPA; see sdpa_attention.py for the masking
  contract). Its norms (layer, q/k and the block's final norm: ``local_block_spec``) are
  ``TorchNorm`` (model/torch_norm.py), Megatron's torch fallback that also works with sequence
  parallelism. Runs on CPU and GPU.
* ``auto``: ``te`` when available, else ``local``.

Both specs give identical checkpoint keys: the local spec maps ``input_layernorm`` /
``pre_mlp_layernorm`` to TE's fused ``linear_qkv.layer_norm_weight`` /
``linear_fc1.layer_norm_weight`` names in its sharded state dict, so a checkpoint written with
one spec loads with the other. Module parameter *names* differ; conversion/mappings.py lists
both.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, NamedTuple

from megatron_rpt import capabilities
from megatron_rpt.errors import ConfigError
from megatron_rpt.model.arch import ArchSpec

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig

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
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_rpt.model.sdpa_attention import SDPACoreAttention
    from megatron_rpt.model.torch_norm import TorchNorm

    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=arch.qk_norm)
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = SDPACoreAttention
    spec.submodules.input_layernorm = TorchNorm
    spec.submodules.pre_mlp_layernorm = TorchNorm
    if arch.qk_norm:
        attention.q_layernorm = attention.k_layernorm = TorchNorm
    else:
        assert attention.q_layernorm is IdentityOp, attention.q_layernorm
    return spec


def local_block_spec(
    layer: object, config: TransformerConfig, vp_stage: int | None, pp_rank: int
) -> object:
    """The decoder block of one pipeline chunk: ``layer`` repeated + a ``TorchNorm`` final norm.

    Given a layer spec, Megatron picks the block's final norm itself (``WrappedTorchNorm``
    without Apex/TE, which refuses sequence parallelism); a block spec names it.
    """
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from megatron_rpt.model.torch_norm import TorchNorm

    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=TorchNorm)


def te_layer_spec(arch: ArchSpec) -> object:
    """Megatron-Core's Transformer Engine spec (GPU only), shared-prefix-capable attention."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    attention = spec.submodules.self_attention.submodules
    shared_prefix_cls = te_shared_prefix_attention()
    # The subclass extends TEDotProductAttention only; any other core attention would receive
    # SharedPrefixParams it does not understand.
    assert attention.core_attention is shared_prefix_cls.__base__, attention.core_attention
    attention.core_attention = shared_prefix_cls
    return spec


@functools.cache
def te_shared_prefix_attention() -> type:
    """``TEDotProductAttention`` that also computes the shared-prefix layout (GPU, TE only).

    With ``SharedPrefixParams`` (model/shared_prefix.py) the pieces become ONE variable-length
    TE attention call: queries are the packed rows in thd format with ``cu_seqlens_q`` over
    the pieces; keys/values are gathered into a buffer with each piece's prefix rows before
    its own rows (``kv_index``, gradients scatter-added back by autograd) with
    ``cu_seqlens_kv``; the mask is TE's ``padding_causal_bottom_right`` (query i of a piece
    sees keys j <= i + K - L), which flash-attention and cuDNN implement natively. Megatron's
    ``TEDotProductAttention.forward`` is bypassed for these calls because its mask-type enum
    has no padding + bottom-right variant; TE's own ``DotProductAttention.forward`` is called.
    Not yet run on a GPU in this repository; tests/gpu/test_shared_prefix_gpu.py checks it
    against a dense reference and the packed layout where a GPU is present.
    """
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    from megatron_rpt.model.shared_prefix import SharedPrefixParams, check_attention_call

    class TESharedPrefixAttention(TEDotProductAttention):
        def forward(  # noqa: D102
            self,
            query: Any,
            key: Any,
            value: Any,
            attention_mask: Any,
            attn_mask_type: Any,
            attention_bias: Any = None,
            packed_seq_params: Any = None,
            **kwargs: Any,
        ) -> Any:
            if not isinstance(packed_seq_params, SharedPrefixParams):
                return super().forward(
                    query,
                    key,
                    value,
                    attention_mask,
                    attn_mask_type,
                    attention_bias=attention_bias,
                    packed_seq_params=packed_seq_params,
                    **kwargs,
                )
            params = packed_seq_params
            check_attention_call(params, query, attention_mask, attention_bias)
            if self.config.qk_clip or self.config.log_max_attention_logit:
                raise ConfigError("shared-prefix attention does not support qk_clip on TE")
            kv_index = params.kv_index
            q_TND = query.squeeze(1).contiguous()
            k_KGD = key.squeeze(1).index_select(0, kv_index)
            v_KGD = value.squeeze(1).index_select(0, kv_index)
            # transformer_engine.pytorch.DotProductAttention.forward (TE's, not Megatron's)
            out = super(TEDotProductAttention, self).forward(
                q_TND,
                k_KGD,
                v_KGD,
                None,
                qkv_format="thd",
                cu_seqlens_q=params.cu_seqlens_q,
                cu_seqlens_kv=params.cu_seqlens_kv,
                max_seqlen_q=params.max_seqlen_q,
                max_seqlen_kv=params.max_seqlen_kv,
                attn_mask_type="padding_causal_bottom_right",
            )
            return out.reshape(q_TND.shape[0], 1, -1)  # [T, N*D] -> sbhd [T, 1, N*D]

    return TESharedPrefixAttention
