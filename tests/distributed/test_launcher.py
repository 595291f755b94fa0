"""The gloo test launcher itself: results come back, failures and hangs fail fast."""

import time

import pytest
import torch
import torch.distributed as dist

from megatron_rpt.testing.distributed import run_distributed


def _sum_ranks(rank, world_size, scale):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return float(t.item()) * scale


def _rank1_raises(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 waits for a peer that is gone


def _rank0_hangs(rank, world_size):
    if rank == 0:
        time.sleep(60)
    return rank


def test_results_by_rank():
    assert run_distributed(_sum_ranks, 3, args=(2.0,), timeout=120) == [6.0, 6.0, 6.0]


def test_failure_reports_traceback():
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        run_distributed(_rank1_raises, 2, timeout=120)


def test_hang_times_out():
    start = time.monotonic()
    # Either the outer deadline fires, or rank 1's collective times out first and reports
    # that rank 0 never finished: both fail the test quickly with the hung rank named.
    with pytest.raises((TimeoutError, RuntimeError), match=r"ranks \[0\] did not finish"):
        run_distributed(_rank0_hangs, 2, timeout=15)
    assert time.monotonic() - start < 40


def _return_tensors(rank, world_size):
    return {"t": torch.full((1000,), float(rank)), "rank": rank}


def test_tensor_results_survive_rank_exit():
    # Tensors returned by ranks used to travel as shared file descriptors and could vanish
    # when the rank exited first (EOFError); repeat to make the race visible if it returns.
    for _ in range(3):
        out = run_distributed(_return_tensors, 2, timeout=120)
        assert [float(o["t"].sum()) for o in out] == [0.0, 1000.0]
