"""Named weight transforms between HF and Megatron-Core layouts, on full (unsharded) tensors.

Pure functions: no process groups, no files. TP sharding is a separate step
(``conversion/tp_sharding.py``). Letters: N query heads, G KV heads (query groups), D head dim,
H hidden size, F MLP intermediate size, V true vocabulary, P padded vocabulary.

* ``qkv``: Megatron fuses Q, K and V into one ``linear_qkv`` whose output rows are interleaved
  *per KV group*: for each group g, its N/G query heads, then its key head, then its value
  head, i.e. ``[G, N/G + 2, D]`` flattened. (So a TP shard of whole groups is a contiguous row
  block.) Biases follow the same layout.
* ``gated_mlp``: ``linear_fc1`` is ``cat([gate, up])`` ([2F, H]); Megatron's SwiGLU computes
  ``silu(first half) * second half``.
* ``vocab``: embedding / output rows beyond V are padding (zeros on import, dropped on export).
* ``tied_vocab``: with tied embeddings there is no HF ``lm_head``; a separate Megatron
  ``output_layer`` (last pipeline stage of a PP>1 model) is imported from ``embed_tokens`` and
  never exported.

>>> import torch
>>> ctx = ConversionContext(num_heads=4, num_kv_heads=2, head_dim=1, vocab_size=3,
...                         padded_vocab_size=4)
>>> q, k, v = torch.arange(4.0)[:, None], torch.tensor([[10.0], [11.0]]), torch.tensor([[20.0], [21.0]])
>>> TRANSFORMS["qkv"].to_megatron((q, k, v), ctx).flatten().tolist()
[0.0, 1.0, 10.0, 20.0, 2.0, 3.0, 11.0, 21.0]
>>> [t.flatten().tolist() for t in TRANSFORMS["qkv"].to_hf(TRANSFORMS["qkv"].to_megatron((q, k, v), ctx), ctx)]
[[0.0, 1.0, 2.0, 3.0], [10.0, 11.0], [20.0, 21.0]]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ConversionContext:
    """The sizes transforms need (from the architecture and the padded vocabulary)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int


@dataclass(frozen=True)
class Transform:
    """A named pair of inverse functions: one Megatron tensor <-> a tuple of HF tensors."""

    to_hf: Callable[[torch.Tensor, ConversionContext], tuple[torch.Tensor, ...]]
    to_megatron: Callable[[Sequence[torch.Tensor], ConversionContext], torch.Tensor]


# ----------------------------------------------------------------------------- QKV


def merge_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """q [N*D, ...], k/v [G*D, ...] -> Megatron's interleaved qkv [G*(N/G+2)*D, ...]."""
    rest = q.shape[1:]
    per_group = num_heads // num_kv_heads
    q_g = q.reshape(num_kv_heads, per_group, head_dim, *rest)
    k_g = k.reshape(num_kv_heads, 1, head_dim, *rest)
    v_g = v.reshape(num_kv_heads, 1, head_dim, *rest)
    return torch.cat([q_g, k_g, v_g], dim=1).reshape(-1, *rest)


def split_qkv(
    qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``merge_qkv``: interleaved qkv -> (q [N*D, ...], k [G*D, ...], v [G*D, ...])."""
    rest = qkv.shape[1:]
    per_group = num_heads // num_kv_heads
    grouped = qkv.reshape(num_kv_heads, per_group + 2, head_dim, *rest)
    q = grouped[:, :per_group].reshape(num_heads * head_dim, *rest)
    k = grouped[:, per_group].reshape(num_kv_heads * head_dim, *rest)
    v = grouped[:, per_group + 1].reshape(num_kv_heads * head_dim, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


# ----------------------------------------------------------------------------- gated MLP


def merge_gated_mlp(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate [F, H], up [F, H] -> linear_fc1 [2F, H]."""
    return torch.cat([gate, up], dim=0)


def split_gated_mlp(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_fc1 [2F, H] -> (gate [F, H], up [F, H])."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


# ----------------------------------------------------------------------------- vocabulary


def pad_vocab(weight: torch.Tensor, padded_vocab_size: int) -> torch.Tensor:
    """[V, H] -> [P, H] with zero rows appended (returned as is when P == V)."""
    extra = padded_vocab_size - weight.shape[0]
    assert extra >= 0, (weight.shape, padded_vocab_size)
    if extra == 0:
        return weight
    return torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])], dim=0)


def unpad_vocab(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[P, H] -> [V, H] (the padding rows are dropped; a view when P == V)."""
    assert weight.shape[0] >= vocab_size, (weight.shape, vocab_size)
    return weight if weight.shape[0] == vocab_size else weight[:vocab_size].contiguous()


# ----------------------------------------------------------------------------- registry


def _single(hf: Sequence[torch.Tensor]) -> torch.Tensor:
    assert len(hf) == 1, len(hf)
    return hf[0]


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform(
        to_hf=lambda t, ctx: (t,),
        to_megatron=lambda hf, ctx: _single(hf),
    ),
    "qkv": Transform(
        to_hf=lambda t, ctx: split_qkv(t, ctx.num_heads, ctx.num_kv_heads, ctx.head_dim),
        to_megatron=lambda hf, ctx: merge_qkv(*hf, ctx.num_heads, ctx.num_kv_heads, ctx.head_dim),
    ),
    "gated_mlp": Transform(
        to_hf=lambda t, ctx: split_gated_mlp(t),
        to_megatron=lambda hf, ctx: merge_gated_mlp(*hf),
    ),
    "vocab": Transform(
        to_hf=lambda t, ctx: (unpad_vocab(t, ctx.vocab_size),),
        to_megatron=lambda hf, ctx: pad_vocab(_single(hf), ctx.padded_vocab_size),
    ),
    "tied_vocab": Transform(
        to_hf=lambda t, ctx: (),
        to_megatron=lambda hf, ctx: pad_vocab(_single(hf), ctx.padded_vocab_size),
    ),
}
