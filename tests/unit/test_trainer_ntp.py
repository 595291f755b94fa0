"""The NTP control: its loss through the RPT policy-gradient path has the gradient of plain
cross-entropy, windows cover every token once, and the metrics report the cross-entropy."""

import json

import numpy as np
import pytest
import torch

from megatron_rpt.loss.config import LossConfig
from megatron_rpt.loss.logprobs import logprobs_from_hidden
from megatron_rpt.loss.policy_loss import mismatch_metrics, policy_loss
from megatron_rpt.trainer.ntp import ntp_metrics


def test_policy_gradient_with_unit_advantage_is_cross_entropy():
    """Advantage 1, on-policy (ratio 1), temperature 1, token mean: d(loss) == d(CE)."""
    torch.manual_seed(0)
    logits_TV = torch.randn(13, 40, dtype=torch.float64)
    labels_T = torch.randint(0, 40, (13,))
    mask_T = torch.ones(13, dtype=torch.float64)

    a = logits_TV.clone().requires_grad_(True)
    logp_T = torch.log_softmax(a, dim=-1).gather(-1, labels_T[:, None])[:, 0]
    loss, _ = policy_loss(
        logp_T, torch.ones(13, dtype=torch.float64), mask_T, cfg=LossConfig(), global_num_tokens=13
    )
    loss.backward()

    b = logits_TV.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(b, labels_T).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-12, rtol=0)
    # And the value the training step logs for NTP (mean |logp - 0|) is the cross-entropy.
    m = mismatch_metrics(logp_T, torch.zeros(13), mask_T)
    ce = torch.nn.functional.cross_entropy(logits_TV, labels_T)
    assert float(m["train_rollout_logprob_abs_diff_sum"]) / 13 == pytest.approx(float(ce))


def test_through_the_trainers_fused_output_layer():
    """The trainer's path (logprobs_from_hidden, temperature 1) gives CE's gradients."""
    torch.manual_seed(1)
    hidden_TH, weight_VH = torch.randn(9, 8), torch.randn(16, 8)
    labels_T = torch.randint(0, 16, (9,))
    h, w = hidden_TH.clone().requires_grad_(True), weight_VH.clone().requires_grad_(True)
    logp_T, _ = logprobs_from_hidden(
        h, w, labels_T, true_vocab_size=16, chunk_size=4, compute_entropy=False, temperature=1.0
    )
    loss, _ = policy_loss(
        logp_T, torch.ones(9), torch.ones(9), cfg=LossConfig(), global_num_tokens=9
    )
    loss.backward()
    h2, w2 = hidden_TH.clone().requires_grad_(True), weight_VH.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(h2 @ w2.T, labels_T).backward()
    assert torch.allclose(h.grad, h2.grad, atol=1e-6)
    assert torch.allclose(w.grad, w2.grad, atol=1e-6)


def test_windows_cover_each_train_token_once(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_rpt.trainer.ntp import NTPWindows

    docs = [np.arange(10), np.arange(100, 103), np.arange(200, 201), np.arange(300, 317)]
    builder = IndexedDatasetBuilder(str(tmp_path / "tokens.bin"), dtype=np.int32)
    for d in docs:
        builder.add_document(torch.tensor(d, dtype=torch.int32), [len(d)])
    builder.finalize(str(tmp_path / "tokens.idx"))
    splits = ["train", "train", "train", "valid"]
    (tmp_path / "documents.jsonl").write_text(
        "".join(json.dumps({"doc_index": i, "split": s}) + "\n" for i, s in enumerate(splits))
    )
    windows = NTPWindows(tmp_path, window_tokens=4)
    predicted = []
    for i in range(len(windows)):
        w = windows[i].tolist()
        assert 2 <= len(w) <= 4
        predicted += w[1:]  # every token but the window's first is a target
    # Doc 0 (10 tokens): 9 targets in windows of 3; doc 1: 2 targets; doc 2 (1 token): none;
    # doc 3 is validation.
    assert sorted(predicted) == list(range(1, 10)) + [101, 102]
    assert len(windows) == 3 + 1


def test_ntp_metrics_report_cross_entropy():
    rec = {
        "train/loss": -1.0,
        "train/train_rollout_logprob_abs_diff": 2.0,
        "train/train_rollout_prob_ratio": 0.1,
        "train/token_mult_prob_error": 9.0,
        "step": 3,
    }
    out = ntp_metrics(rec)
    assert out["train/loss"] == 2.0 and out["train/pg_surrogate"] == -1.0
    assert out["train/perplexity"] == pytest.approx(np.exp(2.0))
    assert not any(k.startswith("train/train_rollout") for k in out)
    assert "train/token_mult_prob_error" not in out
