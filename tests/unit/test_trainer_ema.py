"""The EMA teacher's life cycle on a plain module: lazy init, update, the swap (theta restored
bit-exactly), and the checkpoint round trip with its layout check."""

import pytest
import torch

from megatron_rpt.errors import CheckpointError
from megatron_rpt.trainer.ema import EMATeacher


def _teacher(module, decay=0.5, tp_rank=0):
    return EMATeacher([module], decay, tp_rank=tp_rank, pp_rank=0, dp_rank=0)


def test_update_swap_and_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    teacher = _teacher(model)
    assert not teacher.initialized
    teacher.initialize()
    theta0 = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    teacher.update()  # phi = 0.5 * theta0 + 0.5 * (theta0 + 1) = theta0 + 0.5
    theta1 = [p.detach().clone() for p in model.parameters()]
    with teacher.swapped_in():
        for p, t0 in zip(model.parameters(), theta0, strict=True):
            assert torch.allclose(p, t0 + 0.5, atol=1e-7, rtol=0)
    for p, t1 in zip(model.parameters(), theta1, strict=True):
        assert torch.equal(p, t1)  # restored exactly
    teacher.save(tmp_path)
    other = _teacher(torch.nn.Linear(3, 2))
    other.load(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, teacher.shadow, strict=True))
    with pytest.raises(CheckpointError, match="do not match"):
        _teacher(torch.nn.Linear(4, 2)).load(tmp_path)
    with pytest.raises(CheckpointError, match="missing"):
        _teacher(torch.nn.Linear(3, 2), tp_rank=1).load(tmp_path)


def test_restored_even_when_the_block_raises():
    model = torch.nn.Linear(2, 2)
    teacher = _teacher(model)
    teacher.initialize()
    with torch.no_grad():
        model.weight.mul_(3.0)
    before = model.weight.detach().clone()
    with pytest.raises(RuntimeError, match="boom"), teacher.swapped_in():
        raise RuntimeError("boom")
    assert torch.equal(model.weight, before)
