"""Torch RMSNorm / LayerNorm for the local layer spec, usable with sequence parallelism.

Megatron-Core's fallback norm without Apex/TE (``WrappedTorchNorm``) builds the same
``torch.nn.RMSNorm`` but asserts ``not config.sequence_parallel``. What sequence parallelism
asks of a norm is only bookkeeping: each TP rank normalises a different 1/TP of the tokens,
so its weight gradient is a partial sum that must be summed over the TP group. Megatron's
``finalize_model_grads`` does that for every parameter marked ``sequence_parallel = True``
(``_allreduce_non_tensor_model_parallel_grads``), exactly as Apex's ``FusedLayerNorm`` and TE's
norms mark theirs. ``TorchNorm`` is ``WrappedTorchNorm`` plus that mark, so the local spec
(model/specs.py) runs sequence parallelism on CPU. Without sequence parallelism it builds the
identical module (same class, same parameters, same numerics).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig


class TorchNorm:
    """Factory with Megatron's norm signature returning ``torch.nn.RMSNorm``/``LayerNorm``."""

    def __new__(  # noqa: D102 - Megatron builds norms as norm_cls(config=..., hidden_size=..., eps=...)
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        for flag in ("layernorm_zero_centered_gamma", "persist_layer_norm",
                     "memory_efficient_layer_norm"):  # fmt: skip
            if getattr(config, flag, False):
                raise ValueError(f"TorchNorm: {flag} needs Apex or Transformer Engine norms")
        kinds = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}
        if config.normalization not in kinds:
            raise ValueError(f"TorchNorm: normalization {config.normalization!r} not supported")
        norm = kinds[config.normalization](normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            # Read by finalize_model_grads: sum this weight's gradient over the TP group.
            param.sequence_parallel = bool(config.sequence_parallel)  # type: ignore[attr-defined]
        return norm


__all__ = ["TorchNorm"]
