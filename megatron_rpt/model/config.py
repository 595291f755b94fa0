"""Configs of the policy model (what to start from, dtype, layer spec) and of model parallelism.

Megatron's own ``TransformerConfig`` is built from these in exactly one place,
``megatron_rpt/model/build.py``; ``transformer_overrides`` is the escape hatch for any other
``TransformerConfig`` field, checked against ``dataclasses.fields(TransformerConfig)``.
Checks that need the HF architecture (TP must divide the attention and KV heads, PP the layer
count) run in ``build.check_parallel_fit`` once the config.json is known.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_rpt.errors import ConfigError

# TransformerConfig fields the builder derives from the architecture, the dtype or the
# parallel layout; overriding them would silently break weight conversion or parallelism.
RESERVED_OVERRIDES = frozenset(
    {
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "kv_channels",
        "ffn_hidden_size",
        "normalization",
        "layernorm_epsilon",
        "gated_linear_unit",
        "activation_func",
        "add_bias_linear",
        "add_qkv_bias",
        "qk_layernorm",
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "virtual_pipeline_model_parallel_size",
        "sequence_parallel",
        "context_parallel_size",
        "params_dtype",
        "bf16",
        "fp16",
        "pipeline_dtype",
        "use_cpu_initialization",
        "vocab_size",
        # The trainer's loss normalisation and variable-length micro-batches rely on these.
        "calculate_per_token_loss",
        "variable_seq_lengths",
    }
)

# TransformerConfig fields set from ``precision.*`` (model/fp8.py): overriding them would bypass
# the TE/GPU capability check and the resolved-recipe log.
PRECISION_OVERRIDES = frozenset(
    {
        "fp8",
        "fp8_recipe",
        "fp8_param",
        "fp8_margin",
        "fp8_amax_history_len",
        "fp8_amax_compute_algo",
        "first_last_layers_bf16",
        "num_layers_at_start_in_bf16",
        "num_layers_at_end_in_bf16",
    }
)

FP8Recipe = Literal["none", "delayed", "tensorwise", "blockwise", "mxfp8"]


@dataclass(kw_only=True)
class ModelConfig:
    """The model to start from and how Megatron-Core builds it."""

    hf_path: str = "embedded:smollm2"
    """HF model directory (config.json + safetensors + tokenizer) or 'embedded:smollm2'. Gives
    the architecture and tokenizer, and the initial weights unless megatron_checkpoint is set."""
    megatron_checkpoint: str | None = None
    """Load the initial weights from this Megatron checkpoint instead of hf_path's safetensors:
    a converter/trainer checkpoint dir, a run's checkpoints dir (its latest), or a Megatron-LM
    dir with latest_checkpointed_iteration.txt (torch_dist format). A checkpoint with an hf/
    folder must describe the same architecture as hf_path."""
    dtype: Literal["bfloat16", "float32", "bf16", "fp32"] = "bfloat16"
    """Parameter/compute dtype (the short names bf16/fp32 are read as bfloat16/float32).
    bfloat16 wraps the model in Megatron's Float16Module."""
    spec: Literal["auto", "local", "te"] = "auto"
    """Layer spec: 'te' (Transformer Engine), 'local' (Megatron-Core modules + torch SDPA core
    attention) or 'auto' (TE when it imports and a GPU is present, else local)."""
    transformer_overrides: dict[str, Any] = field(default_factory=dict)
    """Extra megatron.core TransformerConfig fields, e.g. {'attention_dropout': 0.1}. Keys are
    checked against TransformerConfig; fields derived from the architecture are refused."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this times the TP size (the padding rows are masked
    out of logits and never exported). A checkpoint keeps the padded size it was saved with."""
    recompute_granularity: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: none, selective (core attention) or full (whole layers)."""
    recompute_method: Literal["uniform", "block"] = "uniform"
    """How full recomputation picks layers (Megatron's recompute_method)."""
    recompute_num_layers: int = 1
    """Layers per recomputation chunk (uniform) or recomputed layers per stage (block)."""


@dataclass(kw_only=True)
class ParallelConfig:
    """Model parallelism; the data-parallel size is world_size / (TP x PP)."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (must divide the attention and KV heads)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size (stages x virtual stages must divide the layer count)."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline rank (interleaved 1F1B); None for one chunk."""
    sequence_parallel: bool = False
    """Megatron's sequence parallelism (needs TP >= 2): norms, residuals and dropout run on
    1/TP of the tokens; each layer's all-reduce becomes an all-gather + reduce-scatter.
    Activation memory outside attention/MLP drops by TP; micro-batches are padded to a
    multiple of TP tokens. Works with every micro-batch layout, on CPU and GPU."""
    context_parallel_size: int = 1
    """Context parallelism: the sequence is split over this many ranks inside attention
    (Transformer Engine attention, GPU only; packed layout only, see docs/SCALING.md).
    The data-parallel size becomes world / (TP x PP x CP)."""


@dataclass(kw_only=True)
class PrecisionConfig:
    """Low-precision training (Transformer Engine FP8) and FP8 rollout weights (docs/FP8.md).

    Master weights, optimizer state, checkpoints and HF exports stay in model.dtype (bf16 or
    fp32; fp32 main parameters in the optimizer): FP8 only changes how TE's linear layers compute.
    """

    fp8: FP8Recipe = "none"
    """FP8 training recipe of the TE linear layers: 'none' (model.dtype only), 'delayed'
    (per-tensor scales from an amax history), 'tensorwise' (per-tensor current scaling),
    'blockwise' (1x128 activation / 128x128 weight tiles; Hopper, CUDA >= 12.9) or 'mxfp8'
    (32-element blocks with power-of-two scales; Blackwell). Needs Transformer Engine, a
    capable GPU and the TE layer spec (model.spec te or auto)."""
    fp8_format: Literal["e4m3", "hybrid"] = "e4m3"
    """FP8 dtypes: 'e4m3' everywhere, or 'hybrid' (e4m3 forward, e5m2 for gradients; common for
    delayed/tensorwise). 'e4m3' works with every recipe."""
    first_last_layers_bf16: bool = False
    """Keep the first num_layers_at_start_in_bf16 and last num_layers_at_end_in_bf16
    transformer layers out of FP8 (not with 'delayed': Megatron refuses it)."""
    num_layers_at_start_in_bf16: int = 1
    """Layers at the start kept in model.dtype when first_last_layers_bf16 is set."""
    num_layers_at_end_in_bf16: int = 1
    """Layers at the end kept in model.dtype when first_last_layers_bf16 is set."""
    fp8_amax_history_len: int = 1024
    """'delayed' only: length of the amax history the scale is computed from (TE's default)."""
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    """'delayed' only: scale from the largest amax of the history or the most recent one."""
    fp8_margin: int = 0
    """'delayed' only: scale = 2^-margin * fp8_max / amax (headroom against growth)."""
    rollout_fp8: bool = False
    """Quantize the linear weights of the decoder layers to blockwise FP8 (e4m3, square
    blocks, fp32 *.weight_scale_inv) during each weight sync, for an FP8-served SGLang model
    (tools/convert_hf_to_fp8.py writes its initial checkpoint). Embeddings, lm_head, norms and
    biases stay in the pushed dtype."""
    rollout_fp8_block_size: int = 128
    """Side of the square quantization block (SGLang/DeepGEMM kernels expect 128)."""
    rollout_fp8_pow2_scales: bool = False
    """Round every block scale up to a power of two (the 'ue8m0' scale format of
    DeepSeek-V3.1-style checkpoints / DeepGEMM on Blackwell)."""


def check_precision_config(precision: PrecisionConfig, prefix: str = "precision") -> None:
    """Field ranges and recipe combinations; raise ConfigError naming the field."""
    if precision.fp8 not in ("none", "delayed", "tensorwise", "blockwise", "mxfp8"):
        raise ConfigError(f"{prefix}.fp8: {precision.fp8!r} is not a known FP8 recipe")
    for name in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16", "fp8_margin"):
        if getattr(precision, name) < 0:
            raise ConfigError(f"{prefix}.{name} must be >= 0, got {getattr(precision, name)}")
    if precision.fp8_amax_history_len < 1:
        raise ConfigError(f"{prefix}.fp8_amax_history_len must be >= 1")
    if precision.rollout_fp8_block_size < 1:
        raise ConfigError(f"{prefix}.rollout_fp8_block_size must be >= 1")
    if precision.first_last_layers_bf16 and precision.fp8 == "delayed":
        raise ConfigError(
            f"{prefix}.first_last_layers_bf16 does not work with {prefix}.fp8=delayed "
            "(Megatron-Core refuses it: per-layer autocast breaks the amax reduction); use "
            "tensorwise or blockwise"
        )


def check_model_config(model: ModelConfig) -> None:
    """Checks that need no architecture; raise ConfigError naming the field."""
    if model.make_vocab_size_divisible_by < 1:
        raise ConfigError("model.make_vocab_size_divisible_by must be >= 1")
    if model.recompute_num_layers < 1:
        raise ConfigError("model.recompute_num_layers must be >= 1")
    if model.transformer_overrides:
        check_transformer_overrides(model.transformer_overrides)


def check_transformer_overrides(overrides: dict[str, Any]) -> None:
    """Every key must be a TransformerConfig field and not one the builder owns."""
    from megatron.core.transformer import TransformerConfig  # heavy; only when overrides exist

    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    for key in overrides:
        if key not in known:
            import difflib

            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"model.transformer_overrides: '{key}' is not a TransformerConfig field{hint}"
            )
        if key == "fp8_param":
            raise ConfigError(
                "model.transformer_overrides: 'fp8_param' (FP8 parameters) is not supported: "
                "weight sync, checkpoints and HF export read parameters as plain tensors"
            )
        if key in PRECISION_OVERRIDES:
            raise ConfigError(
                f"model.transformer_overrides: '{key}' is set from the precision.* config "
                "(precision.fp8, precision.fp8_format, ...); set it there"
            )
        if key in RESERVED_OVERRIDES:
            raise ConfigError(
                f"model.transformer_overrides: '{key}' is set from the HF architecture, "
                "model.dtype or the parallel config and cannot be overridden"
            )


def check_parallel_config(parallel: ParallelConfig) -> None:
    """Sizes are positive; virtual stages need pipeline parallelism, SP needs TP >= 2."""
    for name in (
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "context_parallel_size",
    ):
        if getattr(parallel, name) < 1:
            raise ConfigError(f"parallel.{name} must be >= 1")
    vpp = parallel.virtual_pipeline_model_parallel_size
    if vpp is not None:
        if vpp < 2:
            raise ConfigError("parallel.virtual_pipeline_model_parallel_size must be None or >= 2")
        if parallel.pipeline_model_parallel_size < 2:
            raise ConfigError(
                "parallel.virtual_pipeline_model_parallel_size needs "
                "parallel.pipeline_model_parallel_size >= 2"
            )
    if parallel.sequence_parallel and parallel.tensor_model_parallel_size < 2:
        raise ConfigError(
            "parallel.sequence_parallel needs parallel.tensor_model_parallel_size >= 2 "
            "(it splits the tokens over the tensor-parallel ranks)"
        )


__all__ = [
    "ModelConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "check_model_config",
    "check_precision_config",
    "check_parallel_config",
    "check_transformer_overrides",
]
