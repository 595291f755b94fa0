"""A dense reference for attention with an arbitrary visibility mask (shared-prefix tests)."""

from __future__ import annotations

import math

import torch


def reference_attention(
    q_TND: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor, visible_TT: torch.Tensor
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v where ``visible_TT[s, k]``, with GQA (G KV heads for N query
    heads); returns [T, N * D].

    >>> q = torch.randn(3, 2, 4); kv = torch.randn(3, 1, 4)
    >>> out = reference_attention(q, kv, kv, torch.ones(3, 3, dtype=torch.bool).tril())
    >>> out.shape, torch.allclose(out[0], kv[0, 0].repeat(2))
    (torch.Size([3, 8]), True)
    """
    reps = q_TND.shape[1] // k_TGD.shape[1]
    k, v = (t.repeat_interleave(reps, dim=1) for t in (k_TGD, v_TGD))
    scores = torch.einsum("snd,knd->nsk", q_TND, k) / math.sqrt(q_TND.shape[-1])
    scores = scores.masked_fill(~visible_TT, float("-inf"))
    return torch.einsum("nsk,knd->snd", scores.softmax(-1), v).reshape(q_TND.shape[0], -1)
