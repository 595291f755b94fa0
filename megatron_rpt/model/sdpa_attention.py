"""Core attention for the local layer spec: ``torch.nn.functional.scaled_dot_product_attention``.

Swapped into Megatron's local spec (``specs.local_layer_spec``) in place of
``DotProductAttention``, whose score buffer is allocated on ``torch.cuda.current_device()``
(MEGATRON_ON_CPU.md C3). On GPU it also lets torch pick a fused (flash / memory-efficient)
kernel instead of materialising the ``[b, np, sq, sk]`` score matrix.

Shape legend: S query length, K key length, B batch, N query heads on this TP rank, G KV heads
on this rank (N/G queries share one KV head, GQA), D head dim.

Masking contract (the same for every caller):

* Attention is **always causal**. When S == K the diagonal is the usual causal mask; when
  S < K (a static-batching decode step after a KV cache) the last query is aligned with the
  last key, i.e. query i sits at absolute position K - S + i.
* ``attention_mask`` is optional and uses Megatron's convention, **True = masked out**, with a
  shape broadcastable to ``[B, 1 or N, S, K]`` (e.g. ``[B, 1, 1, K]`` for key padding). It
  only ever *removes* positions: the result is causal AND not-masked. A mask that already
  contains causality therefore gives the same result as Megatron's own attention, and a
  padding mask is honoured instead of being ignored.
* A query row left with no visible key (e.g. a left-padding token) attends to itself only,
  so no NaN can appear and spread through later layers; such rows are meaningless and must be
  excluded from the loss by the caller.
* ``packed_seq_params`` (THD packed sequences) is not supported yet and raises; so do
  attention biases, sliding windows and non-vanilla softmax variants.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPACoreAttention(MegatronModule):
    """Drop-in ``core_attention`` for Megatron's ``SelfAttention`` using torch SDPA."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: object,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: object = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism")
        if config.window_size is not None:
            raise ValueError("SDPACoreAttention does not support sliding-window attention")
        if config.softmax_type != "vanilla":
            raise ValueError(
                f"SDPACoreAttention supports softmax_type='vanilla' only, not {config.softmax_type!r}"
            )
        if config.apply_query_key_layer_scaling:
            raise ValueError("SDPACoreAttention does not implement apply_query_key_layer_scaling")
        self.softmax_scale = softmax_scale  # None -> SDPA's default 1/sqrt(D)
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: object = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: object = None,
    ) -> torch.Tensor:
        """query [S, B, N, D], key/value [K, B, G, D] -> context [S, B, N*D]."""
        if packed_seq_params is not None:
            raise NotImplementedError("SDPACoreAttention: packed sequences are not supported yet")
        if attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention: attention_bias is not supported")
        q_BNSD, k_BGKD, v_BGKD = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        seq_q, seq_k = q_BNSD.shape[2], k_BGKD.shape[2]
        mask = None
        if attention_mask is not None or seq_q != seq_k:
            mask = visible_mask(seq_q, seq_k, attention_mask, device=q_BNSD.device)
        dropout_p = self.dropout_p if self.training else 0.0
        # Like Megatron's DotProductAttention: dropout draws from the model-parallel RNG.
        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if dropout_p > 0
            else contextlib.nullcontext()
        )
        with rng:
            ctx_BNSD = F.scaled_dot_product_attention(
                q_BNSD,
                k_BGKD,
                v_BGKD,
                attn_mask=mask,
                dropout_p=dropout_p,
                is_causal=mask is None,
                scale=self.softmax_scale,
                enable_gqa=q_BNSD.shape[1] != k_BGKD.shape[1],
            )
        ctx_SBND = ctx_BNSD.permute(2, 0, 1, 3)
        return ctx_SBND.reshape(seq_q, ctx_SBND.shape[1], -1)


def visible_mask(
    seq_q: int, seq_k: int, attention_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Boolean [.., S, K] mask, True = may attend (SDPA's convention); see the module docstring.

    >>> visible_mask(2, 3, None, torch.device("cpu")).int().tolist()
    [[1, 1, 0], [1, 1, 1]]
    >>> pad = torch.tensor([[[[True, False, False]]]])  # key 0 is padding
    >>> visible_mask(3, 3, pad, torch.device("cpu"))[0, 0].int().tolist()
    [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    """
    offset = seq_k - seq_q
    q_pos = torch.arange(seq_q, device=device)[:, None] + offset
    k_pos = torch.arange(seq_k, device=device)[None, :]
    visible = k_pos <= q_pos
    if attention_mask is not None:
        visible = visible & ~attention_mask.to(torch.bool)
        # Rows with nothing visible attend to their own position (no NaNs); see module doc.
        empty = ~visible.any(dim=-1, keepdim=True)
        visible = visible | (empty & (k_pos == q_pos))
    return visible
