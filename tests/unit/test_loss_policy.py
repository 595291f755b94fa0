"""PPO/DAPO loss against a hand-written per-token reference; micro-batch invariance; metrics."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rpt.config import RPTConfig, validate
from megatron_rpt.config_utils import apply_overrides
from megatron_rpt.errors import ConfigError
from megatron_rpt.loss import (
    LossConfig,
    accumulate_metrics,
    finalize_metrics,
    kl_penalty,
    logprobs_from_hidden,
    mismatch_metrics,
    policy_loss,
)

# --------------------------------------------------------------------------- reference


def _ref_token_loss(lp, old, adv, rollout, ref, ent, cfg):
    """One token's loss, written branch by branch with scalar tensors (autograd on ``lp``)."""
    r = torch.exp(lp - old)
    lo, hi = 1 - cfg.clip_low, 1 + cfg.clip_high
    if adv >= 0 and r.item() > hi:
        pg = -adv * hi  # clipped: constant, no gradient
    elif adv < 0 and r.item() < lo:
        pg = -adv * lo
    else:
        pg = -adv * r
    pg_value = float(torch.as_tensor(pg).detach())
    if cfg.dual_clip is not None and adv < 0 and pg_value > -cfg.dual_clip * adv:
        pg = -cfg.dual_clip * adv
    if cfg.tis:
        pg = pg * min(math.exp(old - rollout), cfg.tis_cap)
    loss = pg
    if cfg.kl_coef:
        d = lp - ref
        kl = {"k1": d, "k2": 0.5 * d**2, "k3": torch.exp(-d) + d - 1}[cfg.kl_estimator]
        loss = loss + cfg.kl_coef * kl
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * ent
    return loss


def _ref_loss(lp_T, old_T, adv_T, mask_T, roll_T, ref_T, ent_T, seq_T, cfg, n_tok, n_seq):
    per_seq: dict[int, list] = {}
    total = 0.0
    for t in range(len(lp_T)):
        if mask_T[t] == 0:
            per_seq.setdefault(int(seq_T[t]), [])
            continue
        tok = _ref_token_loss(lp_T[t], float(old_T[t]), float(adv_T[t]), float(roll_T[t]),
                              ref_T[t], ent_T[t], cfg)
        per_seq.setdefault(int(seq_T[t]), []).append(tok)
    if cfg.aggregation == "token_mean":
        for toks in per_seq.values():
            total = total + sum(toks)
        return total / n_tok
    for toks in per_seq.values():
        s = sum(toks) if toks else 0.0
        total = total + (s / max(len(toks), 1) if cfg.aggregation == "seq_mean_token_mean" else s)
    return total / n_seq


def _batch(T=40, S=6, seed=0, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(T, generator=g, dtype=torch.float64) * 3
    old = lp + (torch.rand(T, generator=g, dtype=torch.float64) - 0.5) * 2 * spread
    adv = torch.randn(T, generator=g, dtype=torch.float64)
    mask = (torch.rand(T, generator=g) > 0.15).double()
    roll = old + (torch.rand(T, generator=g, dtype=torch.float64) - 0.5) * 2
    ref = lp + (torch.rand(T, generator=g, dtype=torch.float64) - 0.5)
    ent = torch.rand(T, generator=g, dtype=torch.float64) * 2
    seq = torch.sort(torch.randint(0, S, (T,), generator=g)).values
    return dict(lp=lp, old=old, adv=adv, mask=mask, roll=roll, ref=ref, ent=ent, seq=seq)


CASES = [
    LossConfig(),
    LossConfig(clip_low=0.1, clip_high=0.1),
    LossConfig(dual_clip=1.5),
    LossConfig(tis=True, tis_cap=1.5),
    LossConfig(kl_coef=0.3, kl_estimator="k1"),
    LossConfig(kl_coef=0.3, kl_estimator="k2"),
    LossConfig(kl_coef=0.3, kl_estimator="k3", entropy_coef=0.05),
    LossConfig(aggregation="seq_mean_token_mean", dual_clip=2.0, tis=True),
    LossConfig(aggregation="seq_mean_token_sum", entropy_coef=-0.01),
]


@pytest.mark.parametrize("cfg", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_grads_match_hand_written_reference(cfg, seed):
    b = _batch(seed=seed, spread=1.0 if cfg.dual_clip else 0.6)
    n_tok, n_seq = float(b["mask"].sum()) + 3.0, 7.0  # as if other micro-batches existed
    lp = b["lp"].clone().requires_grad_(True)
    ent = b["ent"].clone().requires_grad_(True)
    loss, metrics = policy_loss(
        lp, b["adv"], b["mask"], cfg=cfg, old_logprobs_T=b["old"], rollout_logprobs_T=b["roll"],
        ref_logprobs_T=b["ref"], entropy_T=ent, global_num_tokens=n_tok, global_num_seqs=n_seq,
        seq_ids_T=b["seq"],
    )
    loss.backward()
    rlp = b["lp"].clone().requires_grad_(True)
    rent = b["ent"].clone().requires_grad_(True)
    ref = _ref_loss(rlp, b["old"], b["adv"], b["mask"], b["roll"], b["ref"], rent, b["seq"],
                    cfg, n_tok, n_seq)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lp.grad, rlp.grad, atol=1e-12, rtol=1e-10)
    if cfg.entropy_coef:
        torch.testing.assert_close(ent.grad, rent.grad, atol=1e-12, rtol=1e-10)
    assert float(metrics["loss"]) == pytest.approx(float(ref.detach()))
    # the random batch reaches every region the config can clip in
    assert metrics["clip_low_count"] > 0 and metrics["clip_high_count"] > 0
    if cfg.dual_clip is not None:
        assert metrics["dual_clip_count"] > 0


def test_clip_regions_hand_cases():
    cfg = LossConfig(clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    lp = torch.log(torch.tensor([1.5, 0.5, 5.0, 1.1, 1.5])).double().requires_grad_(True)
    old = torch.zeros(5, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, -1.0, 2.0, -1.0], dtype=torch.float64)
    loss, m = policy_loss(lp, adv, torch.ones(5), cfg=cfg, old_logprobs_T=old,
                          global_num_tokens=1.0)
    loss.backward()
    # per token: clipped high (-1.28), clipped low (+0.8), dual clip (+3), unclipped (-2.2),
    # ratio 1.5 with A<0 is unclipped (+1.5) below the dual bound 3.
    assert float(loss.detach()) == pytest.approx(-1.28 + 0.8 + 3.0 - 2.2 + 1.5)
    assert lp.grad.tolist() == pytest.approx([0.0, 0.0, 0.0, -2.2, 1.5])
    assert [float(m[k]) for k in ("clip_high_count", "clip_low_count", "dual_clip_count")] == [
        1.0, 1.0, 1.0]
    assert float(m["pg_clipped_count"]) == 2.0  # dual clip is counted separately


def test_on_policy_ratio_is_one_with_policy_gradient():
    lp = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    loss, m = policy_loss(lp, adv, torch.ones(3), cfg=LossConfig(), global_num_tokens=3)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(-(1.0 - 0.5 + 2.0) / 3)
    assert lp.grad.tolist() == pytest.approx([-1 / 3, 0.5 / 3, -2 / 3])
    assert float(m["ratio_max"]) == float(m["ratio_min"]) == 1.0
    assert float(m["ppo_kl_sum"]) == 0.0


def test_kl_estimators_hand_values():
    lp, ref = torch.tensor([-1.0]), torch.tensor([-1.0 - math.log(2)])
    assert float(kl_penalty(lp, ref, "k1")) == pytest.approx(math.log(2))
    assert float(kl_penalty(lp, ref, "k2")) == pytest.approx(0.5 * math.log(2) ** 2)
    assert float(kl_penalty(lp, ref, "k3")) == pytest.approx(0.5 + math.log(2) - 1)
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(lp, ref, "k4")


def test_tis_weights_truncated_and_detached():
    cfg = LossConfig(tis=True, tis_cap=2.0)
    lp = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    rollout = torch.log(torch.tensor([1.0, 0.25, 2.0], dtype=torch.float64))
    adv = torch.ones(3, dtype=torch.float64)
    loss, m = policy_loss(lp, adv, torch.ones(3), cfg=cfg, rollout_logprobs_T=rollout,
                          global_num_tokens=3)
    loss.backward()
    weights = [1.0, 2.0, 0.5]  # pi_old / pi_rollout = 1, 4 -> capped at 2, 0.5
    assert lp.grad.tolist() == pytest.approx([-w / 3 for w in weights])
    assert float(m["tis_truncated_count"]) == 1.0
    assert float(m["tis_weight_sum"]) == pytest.approx(3.5)


def test_missing_inputs_raise():
    lp, adv, mask = torch.zeros(2), torch.ones(2), torch.ones(2)
    with pytest.raises(ValueError, match="rollout"):
        policy_loss(lp, adv, mask, cfg=LossConfig(tis=True), global_num_tokens=2)
    with pytest.raises(ValueError, match="reference"):
        policy_loss(lp, adv, mask, cfg=LossConfig(kl_coef=0.1), global_num_tokens=2)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(lp, adv, mask, cfg=LossConfig(entropy_coef=0.1), global_num_tokens=2)
    with pytest.raises(ValueError, match="global_num_tokens"):
        policy_loss(lp, adv, mask, cfg=LossConfig())
    with pytest.raises(ValueError, match="global_num_seqs"):
        policy_loss(lp, adv, mask, cfg=LossConfig(aggregation="seq_mean_token_sum"),
                    global_num_tokens=2)


# ------------------------------------------------------------------ micro-batch invariance


def _split_loss(b, cfg, cuts):
    """Sum of per-micro-batch losses; micro-batches hold whole sequences."""
    n_tok, n_seq = float(b["mask"].sum()), float(len(torch.unique(b["seq"])))
    lp = b["lp"].clone().requires_grad_(True)
    total, metrics = 0.0, []
    bounds = [0, *cuts, len(lp)]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        seq = b["seq"][lo:hi]
        seq_local = torch.unique(seq, return_inverse=True)[1] if hi > lo else seq
        loss, m = policy_loss(
            lp[lo:hi], b["adv"][lo:hi], b["mask"][lo:hi], cfg=cfg, old_logprobs_T=b["old"][lo:hi],
            rollout_logprobs_T=b["roll"][lo:hi], ref_logprobs_T=b["ref"][lo:hi],
            entropy_T=b["ent"][lo:hi], global_num_tokens=n_tok, global_num_seqs=n_seq,
            seq_ids_T=seq_local,
        )
        loss.backward()
        total = total + loss.detach()
        metrics.append(m)
    return total, lp.grad, accumulate_metrics(metrics)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(CASES), st.integers(0, 5), st.data())
def test_sum_of_micro_batch_losses_equals_full_batch(cfg, seed, data):
    b = _batch(seed=seed)
    # cut only at sequence boundaries (a sequence never straddles micro-batches)
    boundaries = sorted({int(i) for i in torch.nonzero(b["seq"][1:] != b["seq"][:-1]) + 1})
    cuts = sorted(data.draw(st.sets(st.sampled_from(boundaries))) if boundaries else [])
    full_loss, full_grad, full_m = _split_loss(b, cfg, [])
    loss, grad, m = _split_loss(b, cfg, cuts)
    torch.testing.assert_close(loss, full_loss, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad, full_grad, atol=1e-12, rtol=1e-12)
    assert m.keys() == full_m.keys()
    for k in m:
        torch.testing.assert_close(m[k], full_m[k], atol=1e-5, rtol=1e-6)


def test_token_mean_allows_cutting_inside_a_sequence():
    b = _batch(seed=3)
    cfg = LossConfig()
    full_loss, full_grad, _ = _split_loss(b, cfg, [])
    loss, grad, _ = _split_loss(b, cfg, [5, 17, 18, 33])
    torch.testing.assert_close(loss, full_loss, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad, full_grad, atol=1e-12, rtol=1e-12)


def test_finalized_metrics_are_means():
    b = _batch(seed=4)
    _, _, m = _split_loss(b, LossConfig(tis=True, kl_coef=0.1), [10, 20])
    out = finalize_metrics(m)
    valid = b["mask"] > 0
    ratio = torch.exp(b["lp"] - b["old"])[valid]
    assert out["num_tokens"] == float(valid.sum())
    assert out["ratio"] == pytest.approx(float(ratio.mean()), rel=1e-5)
    assert out["ratio_max"] == pytest.approx(float(ratio.max()), rel=1e-5)
    assert out["entropy"] == pytest.approx(float(b["ent"][valid].mean()), rel=1e-5)
    assert out["advantage_min"] == pytest.approx(float(b["adv"][valid].min()), rel=1e-5)
    clipped = ((ratio > 1.28) & (b["adv"][valid] > 0)).double().mean()
    assert out["clip_high_frac"] == pytest.approx(float(clipped))


def test_mismatch_metrics_hand_values():
    train = torch.tensor([-1.0, -2.0, -0.5, 7.0])
    rollout = torch.tensor([-1.0, -1.0, -0.5 - math.log(3), float("-inf")])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])  # padding may hold anything
    out = finalize_metrics(mismatch_metrics(train, rollout, mask, ratio_threshold=2.0))
    assert out["train_rollout_logprob_abs_diff"] == pytest.approx((0 + 1 + math.log(3)) / 3)
    assert out["token_mult_prob_error"] == pytest.approx((1 + math.e + 3) / 3, rel=1e-6)
    assert out["train_rollout_prob_ratio"] == pytest.approx((1 + math.exp(-1) + 3) / 3, rel=1e-6)
    assert out["train_rollout_prob_ratio_max"] == pytest.approx(3.0, rel=1e-6)
    assert out["train_rollout_prob_ratio_min"] == pytest.approx(math.exp(-1), rel=1e-6)
    assert out["train_rollout_ratio_outlier_frac"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------- sign and config


def test_one_sgd_step_moves_logprobs_in_the_advantage_direction():
    """Orthogonal hidden states decouple tokens, so each logp moves exactly with sign(A)."""
    T, V = 6, 11
    hidden = torch.eye(T, dtype=torch.float64) * 2.0
    weight = torch.randn(V, T, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 4, 4, 7, 0, 10])
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0, 0.0, 1.5], dtype=torch.float64)
    w = weight.clone().requires_grad_(True)
    lp, _ = logprobs_from_hidden(hidden, w, labels, chunk_size=4, compute_entropy=False)
    loss, _ = policy_loss(lp, adv, torch.ones(T), cfg=LossConfig(), global_num_tokens=T)
    loss.backward()
    with torch.no_grad():
        after, _ = logprobs_from_hidden(hidden, w - 0.1 * w.grad, labels, compute_entropy=False)
    delta = after - lp.detach()
    assert torch.all(delta[adv > 0] > 0) and torch.all(delta[adv < 0] < 0)
    assert torch.all(delta[adv == 0].abs() < 1e-12)


def test_loss_config_in_rpt_config_and_validation():
    cfg = apply_overrides(RPTConfig(), ["loss.clip_high=0.3", "loss.dual_clip=3",
                                        "loss.aggregation=seq_mean_token_sum"])
    assert (cfg.loss.clip_high, cfg.loss.dual_clip, cfg.loss.aggregation) == (
        0.3, 3.0, "seq_mean_token_sum")
    validate(cfg)
    for bad, field in [("loss.dual_clip=0.5", "loss.dual_clip"),
                       ("loss.clip_low=1.0", "loss.clip_low"),
                       ("loss.logprob_chunk_size=0", "loss.logprob_chunk_size"),
                       ("loss.tis_cap=0", "loss.tis_cap")]:
        with pytest.raises(ConfigError, match=field):
            validate(apply_overrides(RPTConfig(), [bad]))
    with pytest.raises(ConfigError, match="loss.kl_estimator"):
        apply_overrides(RPTConfig(), ["loss.kl_estimator=k5"])
    assert dataclasses.asdict(LossConfig())["entropy_coef"] == 0.0
