"""Rollout engines: the ``RolloutEngine`` protocol, the HF-transformers engine, the SGLang
adapter (colocated and disaggregated), and prefix-cache-aware request scheduling.

``sglang`` is imported only inside ``sglang_protocol.py`` and ``sglang_engine.py``, and only
when they are used, so this package imports on a CPU machine without sglang.
"""

from megatron_rpt.rollout.config import RolloutConfig, SGLangServerConfig
from megatron_rpt.rollout.types import (
    Completion,
    FinishReason,
    PrefixCacheStats,
    RolloutEngine,
    SamplingParams,
    tensor_fingerprint,
)

__all__ = [
    "Completion",
    "FinishReason",
    "PrefixCacheStats",
    "RolloutConfig",
    "RolloutEngine",
    "SGLangServerConfig",
    "SamplingParams",
    "build_engine",
    "tensor_fingerprint",
]


def build_engine(cfg: RolloutConfig, model: str) -> RolloutEngine:
    """The engine ``cfg.engine`` names, loaded from ``cfg.model`` or else ``model``."""
    path = cfg.model or model
    if cfg.engine == "hf":
        from megatron_rpt.rollout.hf_engine import HFEngine

        return HFEngine.from_pretrained(
            path, dtype=cfg.dtype, device=cfg.device, max_batch_rows=cfg.max_batch_rows
        )
    from megatron_rpt.rollout.sglang_engine import SGLangEngine

    return SGLangEngine.launch(cfg, path)
