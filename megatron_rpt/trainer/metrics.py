"""Per-step training metrics: what ``PolicyTrainer.train_step`` returns on every rank.

``StepMetrics.as_dict()`` flattens everything for a logger (wandb, JSON lines):

* ``train/*``: loss terms and token statistics reduced over micro-batches and DP ranks
  (``loss`` = the global-batch loss; ``pg_loss``, ``entropy``, ``kl`` (when on), ``ppo_kl``,
  ``ratio`` and its max/min, ``pg_clipped_frac``, ``clip_low_frac``, ``clip_high_frac``,
  ``advantage`` mean/max/min, train-vs-rollout mismatch: ``train_rollout_logprob_abs_diff``,
  ``token_mult_prob_error``, ``train_rollout_prob_ratio`` (+max/min),
  ``train_rollout_ratio_outlier_frac``), plus ``grad_norm``, ``lr``, ``update_successful``;
* ``batch/*``: sequences, tokens, response length mean/max/min, prompt length mean (from the
  batch itself, identical on every rank);
* ``time/*``: ``train_s`` and ``tokens_per_s`` here; the loop adds ``rollout_s``, ``reward_s``,
  ``weight_sync_s`` (``StepMetrics.time_s``);

``rollout/*`` (reward mean, accuracy, fraction of groups kept, engine counters, ...) are not
part of it: the loop merges the batch source's ``StepBatch.record`` into the logged record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepMetrics:
    """Metrics of one optimizer step (identical on every rank)."""

    step: int
    """Optimizer steps completed after this one (1 after the first)."""
    loss: float
    """The global-batch loss (what was back-propagated, summed over micro-batches and DP)."""
    grad_norm: float
    """Global gradient norm before clipping."""
    lr: float
    """Learning rate of the update."""
    update_successful: bool
    """False when the optimizer skipped the update (non-finite gradients)."""
    train: dict[str, float] = field(default_factory=dict)
    """Reduced loss metrics (see the module docstring)."""
    batch: dict[str, float] = field(default_factory=dict)
    """Batch statistics."""
    time_s: dict[str, float] = field(default_factory=dict)
    """Seconds per phase; 'train' here, the loop adds 'rollout', 'reward', 'weight_sync'."""

    @property
    def tokens_per_s(self) -> float:
        """Training throughput: all tokens of the batch / training seconds."""
        seconds = self.time_s.get("train", 0.0)
        return self.batch.get("tokens", 0.0) / seconds if seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Flat ``{'train/loss': ..., 'time/train_s': ...}`` for loggers."""
        out: dict[str, Any] = {"step": self.step}
        out.update({f"train/{k}": v for k, v in self.train.items()})
        out.update(
            {
                "train/loss": self.loss,
                "train/grad_norm": self.grad_norm,
                "train/lr": self.lr,
                "train/update_successful": float(self.update_successful),
            }
        )
        out.update({f"batch/{k}": v for k, v in self.batch.items()})
        out.update({f"time/{k}_s": v for k, v in self.time_s.items()})
        out["time/tokens_per_s"] = self.tokens_per_s
        return out


def batch_statistics(sequences: list[Any]) -> dict[str, float]:
    """Sequence count and length statistics of a list of ``TrainSequence``.

    >>> from megatron_rpt.trainer.batch import TrainSequence
    >>> seqs = [TrainSequence([1, 2], [3], [-1.0], 1.0), TrainSequence([1], [2, 3, 4], [0.0] * 3, -1.0)]
    >>> batch_statistics(seqs)["response_length_mean"], batch_statistics(seqs)["tokens"]
    (2.0, 7.0)
    """
    resp = [s.response_ids.numel() for s in sequences]
    prompt = [s.prompt_ids.numel() for s in sequences]
    n = max(len(resp), 1)
    stats = {
        "sequences": float(len(resp)),
        "tokens": float(sum(resp) + sum(prompt)),
        "response_tokens": float(sum(resp)),
        "response_length_mean": sum(resp) / n,
        "response_length_max": float(max(resp, default=0)),
        "response_length_min": float(min(resp, default=0)),
        "prompt_length_mean": sum(prompt) / n,
    }
    rewards = [s.reward for s in sequences if s.reward is not None]
    if rewards:
        stats["reward_mean"] = sum(rewards) / len(rewards)
    return stats


__all__ = ["StepMetrics", "batch_statistics"]
