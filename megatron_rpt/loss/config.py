"""Config of the RL loss: advantages, PPO/DAPO surrogate, aggregation, mismatch correction.

Defaults follow the RPT paper where it says something: GRPO group advantages, no KL to a
reference policy, entropy coefficient 0. Dynamic sampling is **off** by default
(``dynamic_sampling=False``); the paper's setting, on from step 500
(``dynamic_sampling_start_step``), is switched on by the 14B recipe
(examples/r1_distill_qwen_14b).
The paper trains exactly on-policy (one optimizer step per rollout batch), so the PPO ratio is 1
and the clip range has no effect there; the clip defaults are DAPO's asymmetric 0.2 / 0.28
("clip-higher"), which matter as soon as a run takes several optimizer steps per rollout batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_rpt.errors import ConfigError

KLEstimator = Literal["k1", "k2", "k3"]
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]


@dataclass(kw_only=True)
class LossConfig:
    """GRPO advantages, the clipped policy-gradient loss and the train/rollout mismatch options."""

    advantage_std_normalize: bool = True
    """Divide each group's centred rewards by the group's reward std (GRPO). False keeps only
    the group-mean baseline (Dr. GRPO)."""
    advantage_eps: float = 1e-6
    """Added to the group std before dividing, so an all-equal group gets advantage 0."""

    clip_low: float = 0.2
    """PPO ratio clip below 1: the ratio is clipped to >= 1 - clip_low (for A < 0)."""
    clip_high: float = 0.28
    """PPO ratio clip above 1: the ratio is clipped to <= 1 + clip_high (for A > 0). DAPO's
    clip-higher value; no effect when training is exactly on-policy, as in the paper."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 (e.g. 3.0): for A < 0 the per-token loss is capped at -c * A,
    bounding the update from tokens whose ratio exploded. None disables it."""

    kl_coef: float = 0.0
    """Weight of the KL penalty to a reference policy (0: none, as in the paper; the
    reference log-probs are then not needed)."""
    kl_estimator: KLEstimator = "k3"
    """Per-token KL estimator (Schulman): k1 = log r, k2 = (log r)^2 / 2,
    k3 = exp(-log r) + log r - 1, with log r = logp - ref_logp."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (loss -= entropy_coef * entropy); 0 as in the paper. When 0
    the entropy is still logged but carries no gradient."""

    aggregation: Aggregation = "token_mean"
    """How per-token losses become the batch loss: 'token_mean' (sum over all response tokens
    of the global batch / their number), 'seq_mean_token_mean' (mean over sequences of each
    sequence's token mean), 'seq_mean_token_sum' (mean over sequences of each sequence's token
    sum). Denominators are counted over the whole global batch, so the loss does not depend on
    the micro-batch split or the parallel layout."""

    tis: bool | None = None
    """Token-level truncated importance sampling: weight each token's policy-gradient term by
    min(pi_old / pi_rollout, tis_cap), correcting for the rollout engine's numerics. None
    (default): decided when the run config is validated - on exactly when the rollout engine's
    precision differs from the trainer's or is unknown (e.g. precision.rollout_fp8, bf16
    training vs an fp32 HF engine, SGLang dtype 'auto'); the choice is logged and written to
    the resolved config. Library code handed None applies no TIS."""
    tis_cap: float = 2.0
    """Upper truncation of the TIS weight (verl/slime default 2)."""
    mismatch_ratio_threshold: float = 2.0
    """Tokens whose train/rollout probability ratio lies outside [1/t, t] are counted in the
    'train_rollout_ratio_outlier_frac' metric."""

    logprob_chunk_size: int = 1024
    """Response tokens per chunk in the fused output-layer + log-prob + entropy computation;
    peak extra memory is about 3 * chunk * vocab/tp * 4 bytes."""

    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose rewards are all equal (zero advantage) and keep
    sampling until the batch is full."""
    dynamic_sampling_start_step: int = 500
    """First training step (0-based) at which dynamic sampling is applied (paper: 500)."""
    dynamic_sampling_max_rounds: int = 8
    """Most sampling rounds per training step while filling the batch."""
    dynamic_sampling_on_max_rounds: Literal["partial", "raise"] = "partial"
    """What happens when the batch is not full after the last round: train on the informative
    groups found so far (logged as a warning), or stop with an error."""


def validate_loss_config(cfg: LossConfig, prefix: str = "loss") -> None:
    """Raise ConfigError naming the field when a LossConfig value is out of range."""
    checks = [
        (cfg.advantage_eps > 0, "advantage_eps", "must be > 0"),
        (0 <= cfg.clip_low < 1, "clip_low", "must be in [0, 1)"),
        (cfg.clip_high >= 0, "clip_high", "must be >= 0"),
        (cfg.dual_clip is None or cfg.dual_clip > 1, "dual_clip", "must be None or > 1"),
        (cfg.kl_coef >= 0, "kl_coef", "must be >= 0"),
        (cfg.tis_cap > 0, "tis_cap", "must be > 0"),
        (cfg.mismatch_ratio_threshold > 1, "mismatch_ratio_threshold", "must be > 1"),
        (cfg.logprob_chunk_size >= 1, "logprob_chunk_size", "must be >= 1"),
        (cfg.dynamic_sampling_start_step >= 0, "dynamic_sampling_start_step", "must be >= 0"),
        (cfg.dynamic_sampling_max_rounds >= 1, "dynamic_sampling_max_rounds", "must be >= 1"),
    ]
    for ok, name, what in checks:
        if not ok:
            raise ConfigError(f"{prefix}.{name} {what}, got {getattr(cfg, name)!r}")
