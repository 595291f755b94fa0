"""Build Megatron-Core ``GPTModel`` chunks for this rank from an HF architecture.

This is the ONE place that builds Megatron's ``TransformerConfig``
(``build_transformer_config``), from the normalized HF architecture (model/arch.py), our
``ModelConfig`` and ``ParallelConfig``:

* Llama family: RMSNorm, SwiGLU (``gated_linear_unit`` + silu), no linear biases, RoPE with
  the HF base (and Llama-3 scaling), GQA via ``num_query_groups``, ``kv_channels = head_dim``;
  Qwen2 adds QKV biases, Qwen3 per-head Q/K RMSNorm; tied embeddings share the output layer.
* CPU: ``use_cpu_initialization`` (docs/CPU.md C1) and ``batch_p2p_sync=False`` (C4).
* Training contract (trainer/step.py): ``calculate_per_token_loss=True`` so that Megatron
  neither divides micro-batch losses by their number nor averages gradients over DP (our
  losses carry global-batch denominators), and ``variable_seq_lengths=True`` so pipeline
  stages exchange each micro-batch's shape (token-budget micro-batches differ in length);
  not with virtual pipeline stages (see ``build_transformer_config``).
* ``output="hidden"`` builds ``RPTGPTModel`` (model/rpt_gpt.py), whose last stage returns the
  final hidden states for the fused response-only log-prob; ``"logits"`` the stock GPTModel.
* bf16: params in bf16 and the model wrapped in ``Float16Module`` (C5), as Megatron's DDP
  training does; fp32 models are not wrapped.
* FP8 (``precision.fp8``): the TE recipe fields from ``model/fp8.py``, after checking TE, the
  GPU and the TE layer spec; the resolved recipe is logged. Parameters keep ``model.dtype``.
* Vocabulary padded to a multiple of ``make_vocab_size_divisible_by x TP`` unless a checkpoint
  dictates its padded size. ``VocabSizes`` carries both sizes; logits beyond the true
  vocabulary must go through ``model/logits.py`` before anything reads them.

Model building needs Megatron's parallel state (``megatron_rpt.distributed``); weights are
loaded by ``checkpoint/loading.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megatron_rpt import capabilities, patches
from megatron_rpt.distributed import ParallelGroups
from megatron_rpt.dtypes import short_dtype, torch_dtype
from megatron_rpt.errors import ConfigError
from megatron_rpt.model import fp8
from megatron_rpt.model.arch import ArchSpec
from megatron_rpt.model.config import (
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    check_model_config,
    check_parallel_config,
    check_precision_config,
)
from megatron_rpt.model.specs import layer_spec, local_block_spec, resolve_spec_name

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VocabSizes:
    """True vocabulary (rows the tokenizer can produce) and Megatron's padded size."""

    true: int
    padded: int


@dataclass
class BuiltModel:
    """This rank's model chunks and what they were built from."""

    chunks: list[torch.nn.Module]
    """One module per virtual pipeline stage on this rank (Float16Module-wrapped for bf16)."""
    config: TransformerConfig
    arch: ArchSpec
    vocab: VocabSizes
    spec: str
    """'local' or 'te'."""
    dtype: str
    """'bf16' or 'fp32' (Megatron's short name, as checkpoint metadata records it)."""
    hf_dir: Path | None = None
    """HF folder with the config.json and tokenizer the model came from, when known."""


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Smallest multiple of ``divisible_by * tp`` that holds ``vocab_size``.

    >>> padded_vocab_size(250, 128, 1), padded_vocab_size(250, 128, 2), padded_vocab_size(256, 128, 2)
    (256, 256, 256)
    """
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def check_parallel_fit(arch: ArchSpec, parallel: ParallelConfig) -> None:
    """Parallel sizes the architecture can be split into; errors name the setting."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    vpp = parallel.virtual_pipeline_model_parallel_size or 1
    if arch.num_attention_heads % tp:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size={tp} must divide the "
            f"{arch.num_attention_heads} attention heads of {arch.hf_architecture}"
        )
    if arch.num_kv_heads % tp:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size={tp} must divide the "
            f"{arch.num_kv_heads} KV heads (num_key_value_heads) of {arch.hf_architecture}"
        )
    if arch.num_layers % (pp * vpp):
        raise ConfigError(
            f"parallel.pipeline_model_parallel_size={pp} x virtual size {vpp} must divide "
            f"the {arch.num_layers} layers of {arch.hf_architecture}"
        )


def build_transformer_config(
    arch: ArchSpec,
    model_cfg: ModelConfig,
    parallel: ParallelConfig,
    *,
    initialize: bool = True,
    precision: PrecisionConfig | None = None,
) -> TransformerConfig:
    """The one place a megatron.core ``TransformerConfig`` is built (see module docstring).

    ``initialize=False`` skips Megatron's random initialisation (weights are loaded next).
    Megatron then also skips setting the TP attributes of parameters, so use it at TP=1 only.
    ``precision`` (``cfg.precision``) switches on FP8 training (model/fp8.py).
    """
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    check_model_config(model_cfg)
    check_parallel_config(parallel)
    check_parallel_fit(arch, parallel)
    on_cpu = not capabilities.have_cuda()
    if on_cpu:
        _check_cpu_settings(model_cfg, parallel)
    dtype = torch_dtype(model_cfg.dtype, "model.dtype")
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        context_parallel_size=parallel.context_parallel_size,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=on_cpu,
        perform_initialization=initialize,
        # See the module docstring (training contract); it changes no forward pass.
        calculate_per_token_loss=True,
    )
    if on_cpu:
        kwargs["batch_p2p_sync"] = False
    kwargs.update(_recompute_kwargs(model_cfg))
    kwargs.update(_fp8_kwargs(arch, model_cfg, parallel, precision))
    kwargs.update(model_cfg.transformer_overrides)
    config = TransformerConfig(**kwargs)
    if config.fp8:
        logger.info("%s", fp8.describe(config))
    if config.num_moe_experts is None and parallel.virtual_pipeline_model_parallel_size is None:
        # Set after construction: __post_init__ rejects variable_seq_lengths whenever the MoE
        # token dispatcher is 'allgather' (its default), even for a dense model that has no
        # dispatcher. Only the pipeline p2p code reads it (to exchange tensor shapes). Not with
        # the interleaved schedule: its shape exchange deadlocks at PP >= 4 in 0.16.1
        # (Megatron-LM #5100); the trainer pads its micro-batches to one shape there instead.
        config.variable_seq_lengths = True
    return config


def _check_cpu_settings(model_cfg: ModelConfig, parallel: ParallelConfig) -> None:
    """Settings that need a GPU, or a CPU patch that has been switched off."""
    if parallel.context_parallel_size > 1:
        raise ConfigError(
            f"parallel.context_parallel_size={parallel.context_parallel_size} needs Transformer "
            "Engine attention on a GPU (model.spec=te); use 1 on CPU"
        )
    if model_cfg.recompute_granularity != "none" and "rng" not in patches.enabled_patches():
        raise ConfigError(
            f"model.recompute_granularity={model_cfg.recompute_granularity} on CPU needs the "
            f"'rng' patch, switched off by {patches.ENV_VAR}; add it or use 'none'"
        )


def _fp8_kwargs(
    arch: ArchSpec,
    model_cfg: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig | None,
) -> dict[str, Any]:
    if not fp8.fp8_enabled(precision):
        return {}
    assert precision is not None
    check_precision_config(precision)
    fp8.check_fp8_runtime(precision, resolve_spec_name(model_cfg.spec))
    return fp8.fp8_transformer_kwargs(
        precision, num_layers=arch.num_layers, pipeline_size=parallel.pipeline_model_parallel_size
    )


def _recompute_kwargs(model_cfg: ModelConfig) -> dict[str, Any]:
    if model_cfg.recompute_granularity == "none":
        return {}
    if model_cfg.recompute_granularity == "selective":
        return {"recompute_granularity": "selective"}
    return {
        "recompute_granularity": "full",
        "recompute_method": model_cfg.recompute_method,
        "recompute_num_layers": model_cfg.recompute_num_layers,
    }


def build_model(
    arch: ArchSpec,
    model_cfg: ModelConfig,
    parallel: ParallelConfig,
    groups: ParallelGroups,
    *,
    padded_vocab: int | None = None,
    initialize: bool = True,
    output: str = "logits",
    precision: PrecisionConfig | None = None,
) -> BuiltModel:
    """GPTModel chunk(s) of this rank's pipeline stage(s), in ``model_cfg.dtype``.

    ``padded_vocab`` forces the padded vocabulary (a checkpoint's); it must hold the true
    vocabulary and be divisible by TP. ``initialize=False`` (TP=1 only, see
    ``build_transformer_config``) leaves parameters uninitialised for a loader to fill.
    ``output``: 'logits' (Megatron's GPTModel) or 'hidden' (``RPTGPTModel`` returning final
    hidden states on the last stage, for the trainer's fused log-prob). ``precision``: FP8
    training (``build_transformer_config``).
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.module import Float16Module

    from megatron_rpt.model.rpt_gpt import RPTGPTModel

    if output not in ("logits", "hidden"):
        raise ValueError(f"output must be 'logits' or 'hidden', not {output!r}")
    model_cls, extra = (
        (GPTModel, {}) if output == "logits" else (RPTGPTModel, {"output_hidden_states": True})
    )
    _check_layout(parallel, groups)
    if not initialize and groups.tp_size > 1:
        raise ValueError("initialize=False needs TP=1 (Megatron then skips the TP attributes)")
    config = build_transformer_config(
        arch, model_cfg, parallel, initialize=initialize, precision=precision
    )
    vocab = _vocab_sizes(arch, model_cfg, parallel, padded_vocab)
    spec = layer_spec(model_cfg.spec, arch)
    chunks: list[torch.nn.Module] = []
    for vp_stage in range(groups.num_chunks):
        pre, post = groups.stage_flags(vp_stage)
        chunk_vp = vp_stage if groups.vpp_size else None
        block = (
            local_block_spec(spec.spec, config, chunk_vp, groups.pp_rank)
            if spec.name == "local"
            else spec.spec
        )
        # Tied embeddings over PP stages call `weight.data.cuda()` while building.
        with patches.cuda_device_mode():
            model = model_cls(
                config=config,
                transformer_layer_spec=block,
                vocab_size=vocab.padded,
                max_sequence_length=arch.max_position_embeddings,
                pre_process=pre,
                post_process=post,
                share_embeddings_and_output_weights=arch.tie_word_embeddings,
                position_embedding_type="rope",
                rotary_base=arch.rope_theta,  # type: ignore[arg-type] # float bases are fine
                rope_scaling=arch.rope_scaling_factor is not None,
                rope_scaling_factor=arch.rope_scaling_factor or 8.0,
                pg_collection=groups.pg_collection,
                vp_stage=chunk_vp,
                **extra,
            )
        if config.bf16:
            model = Float16Module(config, model)
        chunks.append(model)
    logger.info(
        "built %s (%d layers, %s) as %d chunk(s) on TP %d/%d PP %d/%d; vocab %d padded to %d",
        arch.hf_architecture,
        arch.num_layers,
        model_cfg.dtype,
        len(chunks),
        groups.tp_rank,
        groups.tp_size,
        groups.pp_rank,
        groups.pp_size,
        vocab.true,
        vocab.padded,
    )
    return BuiltModel(chunks, config, arch, vocab, spec.name, short_dtype(model_cfg.dtype))


def _check_layout(parallel: ParallelConfig, groups: ParallelGroups) -> None:
    got = (groups.tp_size, groups.pp_size, groups.vpp_size)
    want = (
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        parallel.virtual_pipeline_model_parallel_size,
    )
    if got != want:
        raise ConfigError(
            f"parallel config (TP, PP, VPP) = {want} differs from the initialised groups {got}"
        )


def _vocab_sizes(
    arch: ArchSpec, model_cfg: ModelConfig, parallel: ParallelConfig, padded: int | None
) -> VocabSizes:
    tp = parallel.tensor_model_parallel_size
    if padded is None:
        padded = padded_vocab_size(arch.vocab_size, model_cfg.make_vocab_size_divisible_by, tp)
    if padded < arch.vocab_size or padded % tp:
        raise ConfigError(
            f"padded vocabulary {padded} must be >= vocab_size {arch.vocab_size} and divisible "
            f"by parallel.tensor_model_parallel_size={tp}"
        )
    return VocabSizes(true=arch.vocab_size, padded=padded)
