"""Config of the RLP objective (``cfg.rlp``; used when ``train.objective=rlp``).

RLP's other settings live where the RPT run keeps them: G = ``rollout.n_samples``, the
sampling temperature ``rollout.temperature``, the thought length ``rollout.max_new_tokens``,
lr ``optimizer.lr``, KL ``loss.kl_coef``, the PPO clip ``loss.clip_low`` / ``clip_high``.
``apply_rlp_recipe`` sets them to RLP's recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_rpt.errors import ConfigError

if TYPE_CHECKING:
    from megatron_rpt.config import RPTConfig


@dataclass(kw_only=True)
class RLPConfig:
    """RLP's teacher, prompt and thought settings."""

    ema_decay: float = 0.999
    """tau of the no-think EMA teacher: phi <- tau * phi + (1 - tau) * theta after every
    optimizer step (RLP: 0.999; its ablation: 0.99 / 0.995 / 0.9995 all lower)."""
    thought_close: str = "</think>"
    """The marker that ends a thought: the thought is the response up to and including the
    token that completes it (tokens after it get no loss and are not scored). Empty: the
    whole response is the thought."""


def apply_rlp_recipe(cfg: RPTConfig) -> RPTConfig:
    """Set an ``RPTConfig`` to RLP's published recipe (in place; returned for chaining).

    G = 16 thoughts at temperature 0.7, thoughts of up to 2,048 tokens, constant lr 1e-6, no
    KL, contexts of up to 2,048 tokens, one random target position per document, RLP's
    prompt, the thought-length-normalised surrogate and no dynamic sampling.
    """
    cfg.train.objective = "rlp"
    r = cfg.rollout
    r.n_samples, r.temperature, r.max_new_tokens, r.stop_at_final_box = 16, 0.7, 2048, False
    o = cfg.optimizer
    o.lr, o.lr_schedule, o.lr_warmup_steps = 1e-6, "constant", 0
    loss = cfg.loss
    loss.kl_coef, loss.aggregation, loss.dynamic_sampling = 0.0, "seq_mean_token_mean", False
    cfg.prompt.template, cfg.prompt.open_think, cfg.prompt.think_opener = "rlp", True, "<think>\n"
    cfg.data.train_positions, cfg.data.context_tokens = "random_per_document", 2048
    return cfg


def validate_rlp_config(cfg: RLPConfig, prefix: str = "rlp.") -> RLPConfig:
    """Raise ConfigError naming the field for an out-of-range value."""
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ConfigError(f"{prefix}ema_decay must be in [0, 1), got {cfg.ema_decay}")
    return cfg


__all__ = ["RLPConfig", "apply_rlp_recipe", "validate_rlp_config"]
