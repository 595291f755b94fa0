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
    "tensor_fingerprint",
]
