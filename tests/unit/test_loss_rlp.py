"""RLP's math against hand-computed values: the EMA update, the G/(G-1) advantage, the
information gain, the thought span and the thought-only, length-normalised loss."""

import numpy as np
import pytest
import torch

from megatron_rpt.loss.config import LossConfig
from megatron_rpt.loss.policy_loss import policy_loss
from megatron_rpt.loss.rlp import (
    ema_update_,
    information_gain,
    rlp_advantages,
    thought_token_count,
)


def test_ema_update_by_hand():
    phi = [torch.tensor([1.0, -2.0]), torch.tensor([[0.5]])]
    theta = [torch.tensor([3.0, 2.0]), torch.tensor([[0.5]])]
    ema_update_(phi, theta, 0.75)  # 0.75 * phi + 0.25 * theta
    assert phi[0].tolist() == [1.5, -1.0] and phi[1].tolist() == [[0.5]]
    ema_update_(phi, theta, 0.75)
    assert phi[0].tolist() == [1.875, -0.25]
    # tau = 0.999 from theta_0 = 0 towards theta = 1 for 3 steps: 1 - 0.999^3.
    phi = [torch.zeros(1)]
    for _ in range(3):
        ema_update_(phi, [torch.ones(1, dtype=torch.bfloat16)], 0.999)
    assert phi[0].item() == pytest.approx(1 - 0.999**3, abs=1e-7)
    with pytest.raises(ValueError, match="2 EMA tensors for 1"):
        ema_update_([torch.zeros(1), torch.zeros(1)], [torch.zeros(1)], 0.5)


def test_advantage_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 6.0, 3.0], [-1.0, -1.0, -1.0, -1.0]])
    # row 0: mean 3, G/(G-1) = 4/3 -> 4/3 * (-2, -1, 3, 0); no std division
    expected = torch.tensor([[-8 / 3, -4 / 3, 4.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(rlp_advantages(rewards), expected)
    # leave-one-out form: A_i = r_i - mean of the others
    r = rewards[0]
    loo = torch.stack([r[i] - torch.cat([r[:i], r[i + 1 :]]).mean() for i in range(4)])
    assert torch.allclose(rlp_advantages(rewards)[0], loo)
    assert rlp_advantages(torch.tensor([[5.0]])).tolist() == [[0.0]]


def test_information_gain_is_a_detached_difference():
    scored = torch.tensor([-1.0, -3.0], requires_grad=True)
    teacher = torch.tensor([-2.0, -2.0])
    gain = information_gain(scored, teacher)
    assert gain.tolist() == [1.0, -1.0] and not gain.requires_grad
    with pytest.raises(ValueError, match="same shape"):
        information_gain(scored, torch.zeros(3))


PIECES = ["I", " think", " it", "</", "think", ">", " ka", "<eos>"]


def _decode(ids):
    return "".join(PIECES[i] for i in ids)


@pytest.mark.parametrize(
    "ids, close, expected",
    [
        (list(range(8)), "</think>", 6),  # the token completing the marker ends the thought
        (list(range(3)), "</think>", 3),  # never closed: all of it
        (list(range(8)), "", 8),  # no marker configured: all of it
        ([3, 4, 5, 6], "</think>", 3),
    ],
)
def test_thought_token_count(ids, close, expected):
    assert thought_token_count(ids, _decode, close) == expected


def test_thought_only_length_normalised_loss_by_hand():
    """Two thoughts of 2 and 4 tokens, advantages +1 / -0.5, on-policy, seq_mean_token_mean:
    d loss / d logp = -A_i / (|c_i| * 2) on thought tokens; nothing else is in the batch."""
    logp = torch.tensor([-1.0, -2.0, -0.5, -0.1, -0.3, -0.7], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -0.5, -0.5, -0.5, -0.5])
    seq = torch.tensor([0, 0, 1, 1, 1, 1])
    loss, _ = policy_loss(
        logp, adv, torch.ones(6), cfg=LossConfig(aggregation="seq_mean_token_mean"),
        global_num_seqs=2, seq_ids_T=seq,
    )  # fmt: skip
    loss.backward()
    expected = [-1 / 4, -1 / 4, 0.5 / 8, 0.5 / 8, 0.5 / 8, 0.5 / 8]
    assert np.allclose(logp.grad.numpy(), expected)
    # on-policy the surrogate's value is -mean over thoughts of A_i
    assert float(loss) == pytest.approx(-(1.0 - 0.5) / 2)


def test_batch_holds_thought_tokens_only():
    """The policy batch: thought prompt + thought cut after the close marker; the target token
    and what the model wrote after </think> are not in it; rewards and advantages per thought."""
    from megatron_rpt.trainer.rlp import ThoughtGroup, _make_batch

    group = ThoughtGroup(
        prompt_ids=[9, 9, 9], context_ids=[5, 6], target_id=7, opener_ids=[1],
        thoughts=[[0, 1, 2], [3, 4, 5], []], logprobs=[[-1.0] * 3, [-2.0] * 3, []],
        scored=[[1, 0, 1, 2], [1, 3, 4, 5], []], closed=[False, True, False],
        response_lengths=[3, 8, 0],
    )  # fmt: skip
    rewards = torch.tensor([[0.5, -0.5, 0.0]])
    batch = _make_batch([group], rewards, rlp_advantages(rewards))
    assert [s.response_ids.tolist() for s in batch.sequences] == [[0, 1, 2], [3, 4, 5]]
    assert all(s.prompt_ids.tolist() == [9, 9, 9] for s in batch.sequences)
    assert [s.advantage for s in batch.sequences] == [0.75, -0.75]  # 1.5 * (r - 0)
    assert batch.global_num_tokens == 6
