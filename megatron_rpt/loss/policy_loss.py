"""PPO/DAPO clipped policy-gradient loss with explicit global denominators (pure torch).

Shapes: T = response tokens of this micro-batch (flattened over its sequences), S = sequences
of this micro-batch. Every ``*_T`` tensor is aligned: entry t belongs to the response token t.

Per token, with ``r = exp(logp - logp_old)`` and advantage ``A``::

    pg   = max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high))     # PPO, DAPO clip-higher
    pg   = min(pg, -c * A)              if dual_clip = c and A < 0    # dual clip
    pg   = pg * min(pi_old / pi_rollout, tis_cap)                     # token TIS (detached)
    loss = pg + kl_coef * KL_k(logp, logp_ref) - entropy_coef * H

``old_logprobs_T=None`` means exactly on-policy (the paper's setting): ``logp_old`` is
``logp.detach()``, so ``r == 1`` with gradient ``A * grad logp`` and no extra forward pass.

**Aggregation never divides by anything local.** NeMo-RL's pattern (its loss-functions design doc):
the caller counts the valid tokens (``global_num_tokens``) or sequences (``global_num_seqs``)
of the *whole global batch* (all micro-batches, all DP ranks) once per step and passes the same
number to every micro-batch. Then the sum over micro-batches and DP ranks of the returned losses
is exactly the full-batch loss, whatever the split:

>>> from megatron_rpt.loss.config import LossConfig
>>> logp_T = torch.tensor([-1.0, -2.0, -0.5, -3.0], requires_grad=True)
>>> adv_T, mask_T = torch.tensor([1.0, 1.0, -1.0, -1.0]), torch.ones(4)
>>> cfg = LossConfig()
>>> full, _ = policy_loss(logp_T, adv_T, mask_T, cfg=cfg, global_num_tokens=4)
>>> halves = [policy_loss(logp_T[i:i + 2], adv_T[i:i + 2], mask_T[i:i + 2], cfg=cfg,
...                       global_num_tokens=4)[0] for i in (0, 2)]
>>> bool(torch.allclose(full, halves[0] + halves[1]))
True

By default Megatron's schedules divide each micro-batch loss by the number of micro-batches
and DDP averages gradients over DP. The global denominator here already accounts for every
micro-batch and DP rank, so neither may happen: the trainer sets
``calculate_per_token_loss=True``, under which Megatron does neither (trainer/forward.py, "Loss
scaling contract"); nothing is multiplied back.

Metrics are returned as additive sums and counts (plus ``*_max``/``*_min``) over this
micro-batch's valid tokens, ready to be all-reduced and turned into means by
``megatron_rpt.loss.metrics``.
"""

from __future__ import annotations

import math

import torch

from megatron_rpt.loss.config import LossConfig

# exp() of a log-ratio beyond this overflows fp32 long before it means anything; verl and
# slime clamp at the same place. Tokens this far off-policy are clipped anyway.
_MAX_LOG_RATIO = 20.0


def kl_penalty(
    logprobs_T: torch.Tensor, ref_logprobs_T: torch.Tensor, estimator: str
) -> torch.Tensor:
    """Per-token estimate ``[T]`` of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3).

    >>> kl_penalty(torch.tensor([-1.0]), torch.tensor([-1.5]), "k1")
    tensor([0.5000])
    """
    log_r_T = (logprobs_T - ref_logprobs_T).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    if estimator == "k1":
        return log_r_T
    if estimator == "k2":
        return 0.5 * log_r_T.square()
    if estimator == "k3":
        return torch.exp(-log_r_T) + log_r_T - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r} (expected k1, k2 or k3)")


def tis_weights(
    old_logprobs_T: torch.Tensor, rollout_logprobs_T: torch.Tensor, cap: float
) -> torch.Tensor:
    """Token-level truncated importance weights ``min(pi_old / pi_rollout, cap)``, detached."""
    log_w_T = (old_logprobs_T - rollout_logprobs_T).detach().clamp(max=_MAX_LOG_RATIO)
    return torch.exp(log_w_T).clamp(max=cap)


def clipped_surrogate(
    log_ratio_T: torch.Tensor,
    advantages_T: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO loss ``[T]`` (to minimise) and per-token bool indicators of clipping."""
    ratio_T = torch.exp(log_ratio_T.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    unclipped_T = -advantages_T * ratio_T
    clipped_T = -advantages_T * ratio_T.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg_T = torch.maximum(unclipped_T, clipped_T)
    flags = {
        "pg_clipped": clipped_T > unclipped_T,
        "clip_low": (ratio_T < 1.0 - clip_low) & (advantages_T < 0),
        "clip_high": (ratio_T > 1.0 + clip_high) & (advantages_T > 0),
    }
    if dual_clip is not None:
        bound_T = -dual_clip * advantages_T
        dual_T = (advantages_T < 0) & (pg_T > bound_T)
        pg_T = torch.where(dual_T, bound_T, pg_T)
        flags["dual_clip"] = dual_T
    return pg_T, flags


def aggregate(
    loss_T: torch.Tensor,
    mask_T: torch.Tensor,
    *,
    aggregation: str,
    global_num_tokens: float | None = None,
    global_num_seqs: float | None = None,
    seq_ids_T: torch.Tensor | None = None,
    seq_token_counts_S: torch.Tensor | None = None,
) -> torch.Tensor:
    """This micro-batch's share of the global-batch loss (a scalar).

    Args:
        loss_T: per-token loss ``[T]``.
        mask_T: ``[T]`` 1 for tokens that count, 0 for padding.
        aggregation: 'token_mean', 'seq_mean_token_mean' or 'seq_mean_token_sum'.
        global_num_tokens: valid tokens in the whole global batch (token_mean).
        global_num_seqs: sequences in the whole global batch (seq_mean_*).
        seq_ids_T: ``[T]`` index in ``[0, S)`` of the sequence each token belongs to (seq_mean_*).
        seq_token_counts_S: ``[S]`` valid tokens of each whole sequence (seq_mean_token_mean).
            Default: counted from ``mask_T``, which is right when no sequence is split across
            micro-batches or context-parallel ranks.
    """
    masked_T = loss_T * mask_T
    if aggregation == "token_mean":
        if global_num_tokens is None or global_num_tokens <= 0:
            raise ValueError(f"token_mean needs global_num_tokens > 0, got {global_num_tokens}")
        return masked_T.sum() / global_num_tokens
    if aggregation not in ("seq_mean_token_mean", "seq_mean_token_sum"):
        raise ValueError(f"unknown aggregation {aggregation!r}")
    if global_num_seqs is None or global_num_seqs <= 0 or seq_ids_T is None:
        raise ValueError(f"{aggregation} needs seq_ids_T and global_num_seqs > 0")
    num_seqs = int(seq_ids_T.max()) + 1 if seq_ids_T.numel() else 0
    if seq_token_counts_S is not None:
        num_seqs = max(num_seqs, seq_token_counts_S.numel())
    seq_sum_S = masked_T.new_zeros(num_seqs).index_add(0, seq_ids_T, masked_T)
    if aggregation == "seq_mean_token_mean":
        if seq_token_counts_S is None:
            seq_token_counts_S = mask_T.new_zeros(num_seqs).index_add(0, seq_ids_T, mask_T)
        seq_sum_S = seq_sum_S / seq_token_counts_S.to(seq_sum_S.dtype).clamp(min=1)
    return seq_sum_S.sum() / global_num_seqs


def policy_loss(
    logprobs_T: torch.Tensor,
    advantages_T: torch.Tensor,
    mask_T: torch.Tensor,
    *,
    cfg: LossConfig,
    old_logprobs_T: torch.Tensor | None = None,
    rollout_logprobs_T: torch.Tensor | None = None,
    ref_logprobs_T: torch.Tensor | None = None,
    entropy_T: torch.Tensor | None = None,
    global_num_tokens: float | None = None,
    global_num_seqs: float | None = None,
    seq_ids_T: torch.Tensor | None = None,
    seq_token_counts_S: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the PPO/DAPO loss, and its additive metrics.

    Args:
        logprobs_T: trainer log-probs of the response tokens under the current policy (with
            grad), ``[T]`` fp32.
        advantages_T: per-token advantages ``[T]`` (a response's advantage on all its tokens).
        mask_T: ``[T]`` 1 for tokens that count, 0 for padding.
        cfg: clip, dual-clip, KL, entropy, aggregation and TIS settings.
        old_logprobs_T: log-probs of the policy that the ratio is taken against; None means
            exactly on-policy (``logprobs_T.detach()``).
        rollout_logprobs_T: the rollout engine's log-probs of the same tokens (needed for TIS).
        ref_logprobs_T: reference-policy log-probs (needed when ``cfg.kl_coef > 0``).
        entropy_T: per-token entropy of the current policy (needed when
            ``cfg.entropy_coef != 0``; logged when given).
        global_num_tokens, global_num_seqs, seq_ids_T, seq_token_counts_S: see ``aggregate``.

    Returns:
        ``(loss, metrics)``: the scalar loss to back-propagate, and a dict of detached
        per-micro-batch sums/counts/extrema (see ``megatron_rpt.loss.metrics``).
    """
    mask_T = mask_T.to(logprobs_T.dtype)
    old_T = logprobs_T.detach() if old_logprobs_T is None else old_logprobs_T.detach()
    log_ratio_T = logprobs_T - old_T
    pg_T, flags = clipped_surrogate(
        log_ratio_T,
        advantages_T,
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        dual_clip=cfg.dual_clip,
    )
    metrics: dict[str, torch.Tensor] = {}
    if cfg.tis:
        if rollout_logprobs_T is None:
            raise ValueError("loss.tis=true needs the rollout engine's log-probs")
        weight_T = tis_weights(old_T, rollout_logprobs_T, cfg.tis_cap)
        pg_T = pg_T * weight_T
        metrics["tis_weight_sum"] = (weight_T * mask_T).sum()
        metrics["tis_truncated_count"] = ((weight_T >= cfg.tis_cap) * mask_T).sum()
    loss_T = pg_T
    if cfg.kl_coef > 0:
        if ref_logprobs_T is None:
            raise ValueError("loss.kl_coef > 0 needs reference-policy log-probs")
        kl_T = kl_penalty(logprobs_T, ref_logprobs_T, cfg.kl_estimator)
        loss_T = loss_T + cfg.kl_coef * kl_T
        metrics["kl_sum"] = (kl_T.detach() * mask_T).sum()
    if cfg.entropy_coef != 0:
        if entropy_T is None:
            raise ValueError("loss.entropy_coef != 0 needs the per-token entropy")
        loss_T = loss_T - cfg.entropy_coef * entropy_T
    loss = aggregate(
        loss_T,
        mask_T,
        aggregation=cfg.aggregation,
        global_num_tokens=global_num_tokens,
        global_num_seqs=global_num_seqs,
        seq_ids_T=seq_ids_T,
        seq_token_counts_S=seq_token_counts_S,
    )
    metrics.update(_surrogate_metrics(log_ratio_T, pg_T, advantages_T, mask_T, flags))
    if entropy_T is not None:
        metrics["entropy_sum"] = (entropy_T.detach() * mask_T).sum()
    metrics["loss"] = loss.detach()
    return loss, metrics


def _surrogate_metrics(
    log_ratio_T: torch.Tensor,
    pg_T: torch.Tensor,
    advantages_T: torch.Tensor,
    mask_T: torch.Tensor,
    flags: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    log_ratio_T = log_ratio_T.detach()
    ratio_T = torch.exp(log_ratio_T.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    valid_T = mask_T > 0
    out = {
        "num_tokens": mask_T.sum(),
        "pg_loss_sum": (pg_T.detach() * mask_T).sum(),
        "ppo_kl_sum": (-log_ratio_T * mask_T).sum(),
        "ratio_sum": (ratio_T * mask_T).sum(),
        "ratio_max": _masked_extreme(ratio_T, valid_T, largest=True),
        "ratio_min": _masked_extreme(ratio_T, valid_T, largest=False),
        "advantage_sum": (advantages_T * mask_T).sum(),
        "advantage_max": _masked_extreme(advantages_T.float(), valid_T, largest=True),
        "advantage_min": _masked_extreme(advantages_T.float(), valid_T, largest=False),
    }
    for name, flag_T in flags.items():
        out[f"{name}_count"] = (flag_T * mask_T).sum()
    return out


def _masked_extreme(x_T: torch.Tensor, valid_T: torch.Tensor, *, largest: bool) -> torch.Tensor:
    """Max (or min) over valid entries; -inf (+inf) when none, the identity of the reduction."""
    fill = float("-inf") if largest else float("inf")
    x_T = torch.where(valid_T, x_T, torch.full_like(x_T, fill))
    if x_T.numel() == 0:
        return x_T.new_tensor(fill)
    return x_T.max() if largest else x_T.min()


def mismatch_metrics(
    train_logprobs_T: torch.Tensor,
    rollout_logprobs_T: torch.Tensor,
    mask_T: torch.Tensor,
    *,
    ratio_threshold: float = 2.0,
) -> dict[str, torch.Tensor]:
    """Train-vs-rollout log-prob gap of the same tokens, as additive sums (logged every step).

    With ``d = logp_train - logp_rollout`` per valid token, after reduction and
    ``finalize_metrics`` these become: ``train_rollout_logprob_abs_diff`` = mean |d| (slime),
    ``token_mult_prob_error`` = mean exp(|d|) (NeMo-RL; 1 when identical),
    ``train_rollout_prob_ratio`` = mean exp(d) with its ``_max``/``_min``, and
    ``train_rollout_ratio_outlier_frac`` = fraction of tokens with exp(|d|) > ratio_threshold.

    >>> m = mismatch_metrics(torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.0]), torch.ones(2))
    >>> float(m["train_rollout_logprob_abs_diff_sum"]), float(m["train_rollout_prob_ratio_min"])
    (1.0, 0.3678794503211975)
    """
    mask_T = mask_T.to(torch.float32)
    valid_T = mask_T > 0
    d_T = (train_logprobs_T.detach().float() - rollout_logprobs_T.float())
    d_T = torch.where(valid_T, d_T, torch.zeros_like(d_T))  # padding may hold garbage/inf
    abs_T = d_T.abs()
    ratio_T = torch.exp(d_T.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    return {
        "num_tokens": mask_T.sum(),
        "train_rollout_logprob_abs_diff_sum": (abs_T * mask_T).sum(),
        "token_mult_prob_error_sum": (torch.exp(abs_T.clamp(max=_MAX_LOG_RATIO)) * mask_T).sum(),
        "train_rollout_prob_ratio_sum": (ratio_T * mask_T).sum(),
        "train_rollout_prob_ratio_max": _masked_extreme(ratio_T, valid_T, largest=True),
        "train_rollout_prob_ratio_min": _masked_extreme(ratio_T, valid_T, largest=False),
        "train_rollout_ratio_outlier_count": (
            (abs_T > math.log(ratio_threshold)) * mask_T
        ).sum(),
    }
