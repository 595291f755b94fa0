"""The RPT loss: GRPO advantages, the PPO/DAPO surrogate, vocab-parallel log-probs.

Public API:

* ``LossConfig`` (``loss.*`` in the run config), ``validate_loss_config``
* advantages: ``grpo_advantages``, ``grpo_advantages_flat``, ``dynamic_sampling_keep_mask``,
  ``dynamic_sampling_active``, ``DynamicBatchFiller``, ``DynamicSamplingExhausted``
* policy loss (pure, explicit global denominators): ``policy_loss``, ``aggregate``,
  ``clipped_surrogate``, ``kl_penalty``, ``tis_weights``, ``mismatch_metrics``
* metrics: ``accumulate_metrics``, ``all_reduce_metrics``, ``finalize_metrics``
* log-probs (vocab-parallel, explicit ``tp_group``): ``logprobs_from_hidden``,
  ``logprobs_from_logits``, ``naive_logprobs_entropy``, ``response_positions``,
  ``shared_prefix_response_positions``, ``ResponseIndex``
"""

from megatron_rpt.loss.advantages import (
    DynamicBatchFiller,
    DynamicSamplingExhausted,
    dynamic_sampling_active,
    dynamic_sampling_keep_mask,
    grpo_advantages,
    grpo_advantages_flat,
)
from megatron_rpt.loss.config import LossConfig, validate_loss_config
from megatron_rpt.loss.logprobs import (
    ResponseIndex,
    logprobs_from_hidden,
    logprobs_from_logits,
    naive_logprobs_entropy,
    response_positions,
    shared_prefix_response_positions,
)
from megatron_rpt.loss.metrics import accumulate_metrics, all_reduce_metrics, finalize_metrics
from megatron_rpt.loss.policy_loss import (
    aggregate,
    clipped_surrogate,
    kl_penalty,
    mismatch_metrics,
    policy_loss,
    tis_weights,
)

__all__ = [
    "DynamicBatchFiller",
    "DynamicSamplingExhausted",
    "LossConfig",
    "ResponseIndex",
    "accumulate_metrics",
    "aggregate",
    "all_reduce_metrics",
    "clipped_surrogate",
    "dynamic_sampling_active",
    "dynamic_sampling_keep_mask",
    "finalize_metrics",
    "grpo_advantages",
    "grpo_advantages_flat",
    "kl_penalty",
    "logprobs_from_hidden",
    "logprobs_from_logits",
    "mismatch_metrics",
    "naive_logprobs_entropy",
    "policy_loss",
    "response_positions",
    "shared_prefix_response_positions",
    "tis_weights",
    "validate_loss_config",
]
