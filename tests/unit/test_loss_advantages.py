"""GRPO advantages and DAPO dynamic-sampling bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rpt.loss.advantages import (
    DynamicBatchFiller,
    DynamicSamplingExhausted,
    dynamic_sampling_active,
    dynamic_sampling_keep_mask,
    grpo_advantages,
    grpo_advantages_flat,
)


def test_hand_computed_std_on_and_off():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    # mean 0.25; unbiased std = sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    want_centred = [0.75, -0.25, -0.25, -0.25]
    off = grpo_advantages(rewards, std_normalize=False)
    assert off[0].tolist() == pytest.approx(want_centred)
    on = grpo_advantages(rewards, std_normalize=True, eps=0.0)
    assert on[0].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5])


def test_zero_variance_groups_get_zero_not_nan():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.3, 0.3, 0.3]])
    for std in (True, False):
        adv = grpo_advantages(rewards, std_normalize=std)
        assert torch.all(adv == 0) and not torch.isnan(adv).any()
    flat = grpo_advantages_flat(rewards.flatten(), torch.arange(3).repeat_interleave(3))
    assert torch.all(flat == 0)


def test_single_response_group():
    assert grpo_advantages(torch.tensor([[0.7]])).tolist() == [[0.0]]
    assert grpo_advantages_flat(torch.tensor([0.7, 1.0, 0.0]), torch.tensor([5, 9, 9]))[0] == 0


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(2, 8),
    st.booleans(),
    st.randoms(use_true_random=False),
)
def test_flat_equals_grouped_for_any_order(B, G, std, rnd):
    rewards = torch.tensor([[rnd.choice([0.0, 1.0, 0.5]) for _ in range(G)] for _ in range(B)])
    grouped = grpo_advantages(rewards, std_normalize=std)
    perm = torch.randperm(B * G, generator=torch.Generator().manual_seed(rnd.randint(0, 99)))
    ids = (torch.arange(B).repeat_interleave(G) * 7 + 3)[perm]  # arbitrary, non-contiguous ids
    flat = grpo_advantages_flat(rewards.flatten()[perm], ids, std_normalize=std)
    torch.testing.assert_close(flat, grouped.flatten()[perm])


def test_flat_unequal_group_sizes_against_loop():
    rewards = [1.0, 0.0, 0.5, 2.0, 1.0]
    ids = [0, 0, 0, 1, 1]
    got = grpo_advantages_flat(torch.tensor(rewards), torch.tensor(ids), eps=0.0).tolist()
    want = []
    for r, i in zip(rewards, ids, strict=True):
        grp = [x for x, j in zip(rewards, ids, strict=True) if j == i]
        m = sum(grp) / len(grp)
        sd = math.sqrt(sum((x - m) ** 2 for x in grp) / (len(grp) - 1))
        want.append((r - m) / sd)
    assert got == pytest.approx(want, rel=1e-6)


def test_keep_mask_and_activation_step():
    rewards = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.2, 0.3]])
    assert dynamic_sampling_keep_mask(rewards).tolist() == [False, True, False, True]
    assert not dynamic_sampling_active(False, 0, 10)
    assert not dynamic_sampling_active(True, 500, 499)
    assert dynamic_sampling_active(True, 500, 500)


def test_filler_fills_truncates_surplus_and_counts():
    f = DynamicBatchFiller(3, max_rounds=5)
    assert f.add_round(["a", "b"], torch.tensor([[1.0, 0.0], [1.0, 1.0]])) == 1
    assert f.need_more() and f.groups_needed == 2
    assert f.add_round(["c", "d", "e"], torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])) == 3
    assert f.full and not f.need_more()
    assert f.finish() == ["a", "c", "d"]
    assert (f.rounds, f.groups_seen, f.groups_dropped) == (2, 5, 1)


def test_filler_partial_or_raise_after_max_rounds(caplog):
    all_equal = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    f = DynamicBatchFiller(4, max_rounds=2, on_max_rounds="partial")
    while f.need_more():
        f.add_round(["x", "y"], all_equal)
    assert f.rounds == 2
    with caplog.at_level("WARNING"):
        assert f.finish() == ["y", "y"]
    assert "kept 2 of 4 groups after 2 rounds" in caplog.text

    g = DynamicBatchFiller(4, max_rounds=1, on_max_rounds="raise")
    g.add_round(["x", "y"], all_equal)
    assert not g.need_more()
    with pytest.raises(DynamicSamplingExhausted, match="dynamic_sampling_max_rounds"):
        g.finish()


def test_filler_rejects_misuse():
    with pytest.raises(ValueError):
        DynamicBatchFiller(0, max_rounds=1)
    f = DynamicBatchFiller(1, max_rounds=1)
    with pytest.raises(ValueError, match="rows"):
        f.add_round(["a"], torch.zeros(2, 2))
