"""Config of the trainer -> rollout-engine weight sync (``cfg.weight_sync``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_rpt.errors import ConfigError

VerifyMode = Literal["none", "probe", "checksum", "full"]
PushDtype = Literal["model", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"]


@dataclass(kw_only=True)
class WeightSyncConfig:
    """How the trainer's weights reach the rollout engine after each update, and how the
    result is checked (see megatron_rpt/weight_sync/__init__.py for the path)."""

    bucket_bytes: int = 512 * 1024 * 1024
    """Most bytes of full (TP-gathered) Megatron tensors materialised at once, in the model's
    dtype (slime's default, 512 MiB). A tensor larger than this travels alone. The sync holds
    about one bucket beyond the model: set rollout.sglang.bucket_bytes no larger than this."""
    verify: VerifyMode = "probe"
    """Check after every sync: 'none'; 'probe' (log-probs of the engine's greedy continuation
    of a fixed prompt vs the trainer's forward, mean difference within probe_tolerance); 'checksum' (probe + fingerprints
    of the first checksum_rows rows of every pushed tensor vs what the engine holds); 'full'
    (probe + fingerprints of every byte of every pushed tensor). A failure raises
    WeightSyncError on every rank."""
    probe_tolerance: float = 0.1
    """Largest allowed mean |engine log-prob - trainer log-prob| (nats) over the probe tokens.
    Healthy bf16 engines differ from the trainer by about 0.01-0.04 on average (the
    train/rollout log-prob gap other RL stacks report); broken weights by whole nats. Use ~1e-3 for fp32 on both sides."""
    probe_prompt_tokens: int = 16
    """Length of the fixed probe prompt (token ids drawn once from probe_seed)."""
    probe_new_tokens: int = 8
    """Tokens the engine decodes greedily after the probe prompt (their log-probs are compared)."""
    probe_seed: int = 0
    """Seed of the probe prompt's token ids (the prompt is the same at every sync)."""
    checksum_rows: int = 64
    """verify='checksum': rows (dim 0) of each tensor hashed on both sides."""
    dtype: PushDtype = "model"
    """Dtype of the pushed HF tensors: 'model' (the trainer's parameter dtype) or an explicit
    'float32' / 'bfloat16' / 'float16' (or fp32 / bf16 / fp16; converted after gathering)."""


def validate_weight_sync_config(cfg: WeightSyncConfig, prefix: str = "weight_sync") -> None:
    """Raise ConfigError naming the field for values the sync cannot use."""
    if cfg.bucket_bytes < 1:
        raise ConfigError(f"{prefix}.bucket_bytes must be >= 1, got {cfg.bucket_bytes}")
    if not cfg.probe_tolerance > 0:
        raise ConfigError(f"{prefix}.probe_tolerance must be > 0, got {cfg.probe_tolerance}")
    for name in ("probe_prompt_tokens", "probe_new_tokens", "checksum_rows"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{prefix}.{name} must be >= 1, got {getattr(cfg, name)}")
