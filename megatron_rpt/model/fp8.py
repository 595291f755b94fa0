"""FP8 training with Transformer Engine: what each recipe does, and how it reaches Megatron.

**The numbers.** FP8 comes in two formats. e4m3 has 4 exponent and 3 mantissa bits: values up
to 448, a relative step of 2^-3 (about two significant digits), subnormals down to 2^-9. e5m2
trades a mantissa bit for range (up to 57,344) and suits gradients, whose spread is wider.
``precision.fp8_format='e4m3'`` uses e4m3 everywhere; ``'hybrid'`` uses e5m2 for the gradients.

**A GEMM in FP8.** Each operand is multiplied by a scale that brings its largest magnitude
(*amax*) near the format's maximum, cast to FP8, multiplied on the tensor cores with fp32
accumulation, and the product is un-scaled into bf16. The recipes differ in *where* a scale
applies and *when* it is computed:

* ``delayed``: one scale per tensor, from the amax of previous iterations (a history window of
  ``fp8_amax_history_len`` steps, reduced with ``fp8_amax_compute_algo``). Cheapest, but a
  value larger than anything in the history is clipped.
* ``tensorwise`` (current scaling): one scale per tensor from the tensor's own amax, computed
  right before the cast: one extra reduction per tensor, no stale scales.
* ``blockwise``: activations and gradients in 1x128 tiles, weights in 128x128 tiles, each with
  its own fp32 scale (the DeepSeek-V3 recipe): an outlier only coarsens its own tile. Needs
  Hopper and CUDA >= 12.9 (fp32-scale blockwise GEMMs are not available on Blackwell).
* ``mxfp8``: OCP microscaling, 32-element blocks with power-of-two (E8M0) scales, native on
  Blackwell tensor cores.

**What runs in FP8.** Only the GEMMs of TE's linear layers (QKV, attention output, MLP fc1 and
fc2), forward and backward (data and weight gradients). Embeddings, the output layer (our
fused log-prob), attention itself, norms, residual adds, the loss and the optimizer stay in
``model.dtype`` / fp32. Parameters stay in ``model.dtype`` with fp32 main copies in the
optimizer; the FP8 weight copies are transient. Checkpoints and HF exports therefore hold the
same bf16/fp32 tensors as without FP8. ``first_last_layers_bf16`` keeps whole layers at the
ends of the stack out of FP8, where quantization error hurts most.

**How it reaches Megatron.** ``fp8_transformer_kwargs`` maps ``PrecisionConfig`` onto
Megatron-Core 0.16.1 ``TransformerConfig`` fields (``fp8``, ``fp8_recipe``, ``fp8_margin``,
``fp8_amax_history_len``, ``fp8_amax_compute_algo``, ``first_last_layers_bf16``,
``num_layers_at_{start,end}_in_bf16``); model/build.py applies them in the one place the
config is built. Megatron's ``TransformerBlock`` then enters ``te.fp8_autocast`` with the
matching TE recipe around each FP8 layer (``megatron.core.fp8_utils.get_fp8_context``).

**Requirements** (``check_fp8_runtime``; a ConfigError naming ``precision.fp8`` otherwise): an
importable Transformer Engine on a CUDA GPU, the TE layer spec, TE's own support check for the
recipe on this GPU, and the TE version Megatron needs for it. FP8 GEMMs also need the token
dimension to be a multiple of 16 (32 for mxfp8): the trainer pads its micro-batches
(``token_alignment``).

This module and model/specs.py are the only ones that import ``transformer_engine`` (lazily).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from megatron_rpt import capabilities
from megatron_rpt.dtypes import short_dtype
from megatron_rpt.errors import ConfigError
from megatron_rpt.model.config import PrecisionConfig

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig

logger = logging.getLogger(__name__)

RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
# TE class behind each recipe (what Megatron's get_fp8_recipe builds) and the TE version it
# needs there (megatron/core/fp8_utils.py, 0.16.1).
TE_RECIPE_CLASS = {
    "delayed": "DelayedScaling",
    "tensorwise": "Float8CurrentScaling",
    "blockwise": "Float8BlockScaling",
    "mxfp8": "MXFP8BlockScaling",
}
_MIN_TE_VERSION = {"delayed": "1.0", "tensorwise": "2.2.0.dev0", "blockwise": "2.3.0.dev0"}
_MIN_TE_VERSION["mxfp8"] = "2.1.0"
# When TE offers no support check: the least compute capability per recipe (TE's own rules).
_MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}


def fp8_enabled(precision: PrecisionConfig | None) -> bool:
    """``precision.fp8`` asks for FP8 training."""
    return precision is not None and precision.fp8 != "none"


def fp8_transformer_kwargs(
    precision: PrecisionConfig | None, *, num_layers: int, pipeline_size: int = 1
) -> dict[str, Any]:
    """``TransformerConfig`` fields for ``precision`` (empty without FP8). Pure: no TE needed.

    >>> fp8_transformer_kwargs(PrecisionConfig(fp8="tensorwise"), num_layers=4)
    ... # doctest: +NORMALIZE_WHITESPACE
    {'fp8': 'e4m3', 'fp8_recipe': 'tensorwise', 'fp8_margin': 0, 'fp8_amax_history_len': 1024,
     'fp8_amax_compute_algo': 'max', 'first_last_layers_bf16': False}
    """
    if not fp8_enabled(precision):
        return {}
    assert precision is not None
    if precision.fp8 not in RECIPES:
        raise ConfigError(f"precision.fp8: {precision.fp8!r} is not one of {list(RECIPES)}")
    kwargs: dict[str, Any] = {
        "fp8": precision.fp8_format,
        "fp8_recipe": precision.fp8,
        "fp8_margin": precision.fp8_margin,
        "fp8_amax_history_len": precision.fp8_amax_history_len,
        "fp8_amax_compute_algo": precision.fp8_amax_compute_algo,
        "first_last_layers_bf16": precision.first_last_layers_bf16,
    }
    if precision.first_last_layers_bf16:
        per_stage = num_layers // pipeline_size
        for name in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
            value = getattr(precision, name)
            if not 0 <= value <= per_stage:
                raise ConfigError(
                    f"precision.{name}={value} must be between 0 and the {per_stage} layers "
                    "of one pipeline stage"
                )
            kwargs[name] = value
        if (
            precision.num_layers_at_start_in_bf16 + precision.num_layers_at_end_in_bf16
            >= num_layers
        ):
            raise ConfigError(
                "precision.first_last_layers_bf16 keeps all "
                f"{num_layers} layers in bf16: nothing would run in FP8"
            )
    return kwargs


def check_fp8_runtime(precision: PrecisionConfig, spec_name: str) -> None:
    """Raise ConfigError unless this process can train with ``precision.fp8``.

    ``spec_name`` is the resolved layer spec ('te' or 'local').
    """
    recipe = precision.fp8
    if not (capabilities.have_cuda() and capabilities.have_te()):
        raise ConfigError(
            f"precision.fp8={recipe} needs Transformer Engine and a CUDA GPU "
            f"(cuda={capabilities.have_cuda()}, transformer_engine={capabilities.have_te()}); "
            "use precision.fp8=none here"
        )
    if spec_name != "te":
        raise ConfigError(
            f"precision.fp8={recipe} needs the Transformer Engine layer spec, but the model "
            f"uses the {spec_name!r} spec; set model.spec=te (or auto)"
        )
    ok, reason = recipe_support(recipe)
    if not ok:
        raise ConfigError(
            f"precision.fp8={recipe} is not supported on this GPU ({_device_name()}): {reason}"
        )
    from megatron.core.utils import is_te_min_version

    if not is_te_min_version(_MIN_TE_VERSION[recipe]):
        raise ConfigError(
            f"precision.fp8={recipe} needs Transformer Engine >= {_MIN_TE_VERSION[recipe]} "
            f"with Megatron-Core (installed: {te_version()})"
        )


def recipe_support(recipe: str) -> tuple[bool, str]:
    """TE's own verdict on running ``recipe`` on the current GPU: (supported, reason)."""
    import transformer_engine.pytorch as te

    public = {
        "delayed": "is_fp8_available",
        "tensorwise": "is_fp8_available",
        "blockwise": "is_fp8_block_scaling_available",
        "mxfp8": "is_mxfp8_available",
    }[recipe]
    if hasattr(te, public):
        try:
            return tuple(getattr(te, public)(return_reason=True))  # type: ignore[return-value]
        except TypeError:  # older signature without return_reason
            return bool(getattr(te, public)()), "not supported by Transformer Engine"
    legacy = {
        "delayed": "check_fp8_support",
        "tensorwise": "check_fp8_support",
        "blockwise": "check_fp8_block_scaling_support",
        "mxfp8": "check_mxfp8_support",
    }[recipe]
    try:
        from transformer_engine.pytorch import fp8 as te_fp8

        return tuple(getattr(te_fp8, legacy)())  # type: ignore[return-value]
    except (ImportError, AttributeError):
        import torch

        capability = torch.cuda.get_device_capability()
        need = _MIN_CAPABILITY[recipe]
        return capability >= need, f"needs compute capability >= {need}, have {capability}"


def token_alignment(config: TransformerConfig) -> int:
    """Multiple the token dimension of a micro-batch must have (1 without FP8).

    FP8 GEMMs need 16 (32 with mxfp8), as Megatron's ``get_fp8_align_size`` says.
    """
    if not getattr(config, "fp8", None):
        return 1
    return 32 if config.fp8_recipe == "mxfp8" else 16


def training_precision(model_dtype: str, precision: PrecisionConfig | None) -> str:
    """Label of the numerics the trainer computes log-probs with, e.g. 'bf16' or 'fp8-blockwise'.

    >>> training_precision("bf16", PrecisionConfig()), training_precision("bf16", PrecisionConfig(fp8="delayed"))
    ('bf16', 'fp8-delayed')
    """
    if fp8_enabled(precision):
        return f"fp8-{precision.fp8}"  # type: ignore[union-attr]
    return short_dtype(model_dtype, "model.dtype")


def describe(config: TransformerConfig) -> str:
    """One line naming the resolved recipe of a built ``TransformerConfig`` (for the log)."""
    if not getattr(config, "fp8", None):
        return "FP8 off"
    n = config.num_layers
    start = config.num_layers_at_start_in_bf16 if config.first_last_layers_bf16 else 0
    end = config.num_layers_at_end_in_bf16 if config.first_last_layers_bf16 else 0
    parts = [
        f"FP8 training: recipe {config.fp8_recipe} ({TE_RECIPE_CLASS[config.fp8_recipe]}), "
        f"format {config.fp8}",
        f"layers {start + 1}-{n - end} of {n} in FP8"
        + (f" (first {start} / last {end} in bf16)" if start or end else ""),
    ]
    if config.fp8_recipe == "delayed":
        parts.append(
            f"amax history {config.fp8_amax_history_len} ({config.fp8_amax_compute_algo}), "
            f"margin {config.fp8_margin}"
        )
    parts.append(f"token alignment {token_alignment(config)}")
    parts.append(f"Transformer Engine {te_version()} on {_device_name()}")
    return "; ".join(parts)


def te_version() -> str:
    """Installed Transformer Engine version ('none' when it does not import)."""
    try:
        from megatron.core.utils import get_te_version

        return str(get_te_version())
    except Exception:  # noqa: BLE001 - any failure means TE is unusable here
        return "none"


def _device_name() -> str:
    if not capabilities.have_cuda():
        return "no GPU"
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (sm{major}{minor})"


__all__ = [
    "RECIPES",
    "check_fp8_runtime",
    "describe",
    "fp8_enabled",
    "fp8_transformer_kwargs",
    "recipe_support",
    "te_version",
    "token_alignment",
    "training_precision",
]
