"""Gather per-token values over the context-parallel group (the communication half of
trainer/context_parallel.py, whose ``merge_cp_values`` does the pure reassembly)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_rpt.trainer.context_parallel import batch_token_index, merge_cp_values


def gather_cp_values(
    index_t: torch.Tensor, values_Kt: torch.Tensor, total: int, cp_group: dist.ProcessGroup
) -> torch.Tensor:
    """``[K, total]`` on every rank of ``cp_group`` from each rank's ``values_Kt`` at ``index_t``.

    ``index_t`` ``[t]`` (int64) says where each of this rank's ``t`` values goes (negative: a
    placeholder, dropped). Both on the device the group communicates on (NCCL: the GPU).
    Ranks may hold different ``t``: the parts are padded to the largest
    for the all-gather (three collectives: sizes, indices, values).
    """
    world = dist.get_world_size(cp_group)
    size = torch.tensor([index_t.numel()], dtype=torch.long, device=index_t.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=cp_group)
    longest = max(int(s) for s in sizes)
    index_pad = torch.full((longest,), -1, dtype=torch.long, device=index_t.device)
    index_pad[: index_t.numel()] = index_t
    values_pad = values_Kt.new_zeros(values_Kt.shape[0], longest)
    values_pad[:, : values_Kt.shape[1]] = values_Kt
    indices = [torch.empty_like(index_pad) for _ in range(world)]
    values = [torch.empty_like(values_pad) for _ in range(world)]
    dist.all_gather(indices, index_pad.contiguous(), group=cp_group)
    dist.all_gather(values, values_pad.contiguous(), group=cp_group)
    return merge_cp_values(indices, values, total)


def gather_response_values(
    outputs: list[dict[str, Any]],
    seq_offsets: torch.Tensor,
    total: int,
    cp_group: dist.ProcessGroup,
    device: torch.device | str,
) -> torch.Tensor:
    """``[2, N]`` log-probs and entropies of this DP rank's response tokens (zeros elsewhere).

    ``outputs`` are trainer/forward.py ``logprob_func`` results of CP-split micro-batches;
    ``seq_offsets`` ``[n_batch]`` the start of each sequence's tokens in the batch's flat ``[N]``
    order. Each CP rank holds the tokens it predicts; the all-gather puts them together.
    """
    index = [torch.zeros(0, dtype=torch.long)]
    values = [torch.zeros(2, 0)]
    for out in outputs:
        if not out["seq_indices"]:
            continue  # a padding micro-batch
        index_t, keep_t = batch_token_index(
            out["cp_token_index_T"],
            out["seq_ids_T"],
            out["seq_token_counts_S"],
            out["seq_indices"],
            seq_offsets,
        )
        index.append(index_t)
        values.append(torch.stack([out["logprobs_T"][keep_t], out["entropy_T"][keep_t]]))
    index_t = torch.cat(index).to(device)
    values_2t = torch.cat(values, dim=1).to(device)
    return gather_cp_values(index_t, values_2t, total, cp_group)


__all__ = ["gather_cp_values", "gather_response_values"]
