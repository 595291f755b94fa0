"""Core attention for the local layer spec: ``torch.nn.functional.scaled_dot_product_attention``.

Swapped into Megatron's local spec (``specs.local_layer_spec``) in place of
``DotProductAttention``, whose score buffer is allocated on ``torch.cuda.current_device()``
(docs/CPU.md, C3). On GPU it also lets torch pick a fused (flash / memory-efficient)
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
* Packed sequences (``packed_seq_params.qkv_format == "thd"``): Megatron then passes
  query ``[T, N, D]`` and key/value ``[T, G, D]`` (the batch dimension of 1 squeezed away) and
  reshapes the ``[T, N*D]`` result itself. Attention is causal *within* each segment
  ``[cu_seqlens[i], cu_seqlens[i+1])`` and never crosses segments: one causal SDPA call per
  segment, so memory stays O(longest segment^2) and no dense ``T x T`` mask is ever built.
  ``cu_seqlens_q_padded`` (segments padded for context parallelism) is honoured when given;
  the padding slots then attend causally among themselves and must carry no loss. RoPE
  restarts per segment in Megatron itself (``rope_utils._apply_rotary_pos_emb_thd``, from the
  same ``cu_seqlens``), so positions inside each segment start at 0. ``attention_mask`` must
  be None with packing (segments replace it).
* Shared-prefix layout (``SharedPrefixParams``, model/shared_prefix.py; qkv_format sbhd, query
  ``[T, 1, N, D]``): one SDPA call per piece, its keys/values being the piece's prefix rows
  followed by its own rows, with the bottom-right-aligned causal mask
  (``torch.nn.attention.bias.causal_lower_right``: flash / memory-efficient kernels on GPU,
  a ``[L, prefix + L]`` mask per piece on CPU). Gradients of prefix keys/values read by several
  pieces are summed by autograd.
* Attention biases, sliding windows and non-vanilla softmax variants raise.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.nn.attention.bias import causal_lower_right

from megatron_rpt.model.shared_prefix import SharedPrefixParams, check_attention_call


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
        """query [S, B, N, D], key/value [K, B, G, D] -> context [S, B, N*D].

        Packed (thd): query [T, N, D], key/value [T, G, D] -> context [T, N*D].
        """
        if isinstance(packed_seq_params, SharedPrefixParams):
            return self._forward_shared_prefix(
                query, key, value, attention_mask, attention_bias, packed_seq_params
            )
        if attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention: attention_bias is not supported")
        if packed_seq_params is not None:
            return self._forward_packed(query, key, value, attention_mask, packed_seq_params)
        q_BNSD, k_BGKD, v_BGKD = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        seq_q, seq_k = q_BNSD.shape[2], k_BGKD.shape[2]
        mask = None
        if attention_mask is not None or seq_q != seq_k:
            mask = visible_mask(seq_q, seq_k, attention_mask, device=q_BNSD.device)
        with self._dropout_rng():
            ctx_BNSD = self._sdpa(q_BNSD, k_BGKD, v_BGKD, mask)
        ctx_SBND = ctx_BNSD.permute(2, 0, 1, 3)
        return ctx_SBND.reshape(seq_q, ctx_SBND.shape[1], -1)

    def _forward_packed(
        self,
        query_TND: torch.Tensor,
        key_TGD: torch.Tensor,
        value_TGD: torch.Tensor,
        attention_mask: torch.Tensor | None,
        packed_seq_params: object,
    ) -> torch.Tensor:
        """Causal attention inside each ``cu_seqlens`` segment: [T, N, D] -> [T, N*D]."""
        if getattr(packed_seq_params, "qkv_format", None) != "thd":
            raise NotImplementedError(
                "SDPACoreAttention: packed sequences need qkv_format='thd', got "
                f"{getattr(packed_seq_params, 'qkv_format', None)!r}"
            )
        if attention_mask is not None:
            raise ValueError("SDPACoreAttention: attention_mask must be None with packed sequences")
        bounds = segment_bounds(packed_seq_params, query_TND.shape[0])
        outputs = []
        with self._dropout_rng():
            for start, end in bounds:
                # [L, N, D] -> [1, N, L, D]: one causal SDPA call per sequence.
                q, k, v = (
                    t[start:end].permute(1, 0, 2).unsqueeze(0)
                    for t in (query_TND, key_TGD, value_TGD)
                )
                outputs.append(self._sdpa(q, k, v, None)[0].permute(1, 0, 2))
        ctx_TND = torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0]
        return ctx_TND.reshape(ctx_TND.shape[0], -1)

    def _forward_shared_prefix(
        self,
        query_T1ND: torch.Tensor,
        key_T1GD: torch.Tensor,
        value_T1GD: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attention_bias: torch.Tensor | None,
        params: SharedPrefixParams,
    ) -> torch.Tensor:
        """One SDPA per piece (prefix + own keys, bottom-right causal): -> [T, 1, N*D]."""
        check_attention_call(params, query_T1ND, attention_mask, attention_bias)
        q_TND, k_TGD, v_TGD = (t.squeeze(1) for t in (query_T1ND, key_T1GD, value_T1GD))
        outputs = []
        with self._dropout_rng():
            for piece in params.pieces:
                rows = slice(piece.start, piece.end)
                k_KGD, v_KGD = k_TGD[rows], v_TGD[rows]
                mask = None  # plain causal
                if piece.has_prefix:
                    prefix = slice(piece.prefix_start, piece.prefix_end)
                    k_KGD = torch.cat([k_TGD[prefix], k_KGD])
                    v_KGD = torch.cat([v_TGD[prefix], v_KGD])
                    mask = causal_lower_right(piece.num_queries, piece.num_keys)
                # [L, N, D] -> [1, N, L, D]
                q, k, v = (t.permute(1, 0, 2).unsqueeze(0) for t in (q_TND[rows], k_KGD, v_KGD))
                outputs.append(self._sdpa(q, k, v, mask)[0].permute(1, 0, 2))
        ctx_TND = torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0]
        return ctx_TND.reshape(ctx_TND.shape[0], 1, -1)

    def _dropout_rng(self) -> contextlib.AbstractContextManager:
        # Like Megatron's DotProductAttention: dropout draws from the model-parallel RNG.
        if self.training and self.dropout_p > 0:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()

    def _sdpa(
        self,
        q_BNSD: torch.Tensor,
        k_BGKD: torch.Tensor,
        v_BGKD: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        # mask None: causal; a CausalBias (bottom-right) is applied by SDPA's own dispatch.
        return F.scaled_dot_product_attention(
            q_BNSD,
            k_BGKD,
            v_BGKD,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=mask is None,
            scale=self.softmax_scale,
            enable_gqa=q_BNSD.shape[1] != k_BGKD.shape[1],
        )


def segment_bounds(packed_seq_params: object, total: int) -> list[tuple[int, int]]:
    """``[(start, end)]`` of the packed segments (``cu_seqlens_q_padded`` when given).

    >>> from types import SimpleNamespace
    >>> segment_bounds(SimpleNamespace(cu_seqlens_q=torch.tensor([0, 3, 5]),
    ...                                cu_seqlens_q_padded=None), 5)
    [(0, 3), (3, 5)]
    """
    cu = getattr(packed_seq_params, "cu_seqlens_q_padded", None)
    if cu is None:
        cu = packed_seq_params.cu_seqlens_q  # type: ignore[attr-defined]
    # One host read per layer; Megatron's own THD RoPE reads cu_seqlens the same way.
    cu_list = [int(x) for x in cu.tolist()]
    if (
        cu_list[0] != 0
        or cu_list[-1] != total
        or any(b < a for a, b in zip(cu_list, cu_list[1:], strict=False))
    ):
        raise ValueError(
            f"packed_seq_params.cu_seqlens {cu_list[:8]}... must rise from 0 to the packed "
            f"length {total}"
        )
    return [(a, b) for a, b in zip(cu_list, cu_list[1:], strict=False) if b > a]


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
