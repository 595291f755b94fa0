"""Token log-probs and entropy from vocab-parallel logits, chunked, never gathering the vocab.

Letters: T = response tokens (already sliced, see ``response_positions``), H = hidden size,
V = padded vocab, V/tp = this tensor-parallel rank's vocab rows, C = tokens per chunk.

**Why fused and chunked.** An RPT response is up to 8k tokens and Qwen-family vocabularies
have 152k entries: full fp32 logits ``[T, V]`` are 5 GB per sequence before log-softmax and
backward copy them several times (slime#2253, NeMo-RL#2871). ``logprobs_from_hidden`` applies
the output layer itself, C tokens at a time, and keeps only ``[T]``-sized statistics between
forward and backward; backward recomputes each chunk's logits from the saved hidden states.
Peak extra memory is a few ``[C, V/tp]`` fp32 buffers, independent of T; saved memory is the
``[T, H]`` hidden input. The output GEMM runs in the weight's dtype (as Megatron's output
layer does); log-softmax and entropy run in fp32 (fp64 for fp64 inputs, which the tests use to
check the algorithm to 1e-10 independently of rounding).

**The vocab-parallel softmax.** Each TP rank holds rows ``[vocab_start, vocab_start + V/tp)``
of the output weight. Per chunk, two all-reduces over ``tp_group`` give exact global values:

* MAX of the row maxima -> ``m`` (for a stable exp);
* SUM of ``[sum_v e_v, s_label, sum_v e_v * s_v]`` with ``s = z - m``, ``e = exp(s)``:
  the label's shifted logit comes only from the rank that owns it (the others add 0).

Then ``logp = s_label - log(sum e)`` and ``H = log(sum e) - sum(e * s) / sum(e)``. Backward
needs no communication except the hidden-state gradient, whose vocab shards are summed over
``tp_group`` (what Megatron's ColumnParallelLinear does for its input)::

    d logp / d z_v = 1[v == label] - p_v        d H / d z_v = -p_v (log p_v + H)

**Padding rows.** Megatron pads the vocab to a multiple of 128 * tp; rows with id >=
``true_vocab_size`` are not tokens. They are excluded by slicing each shard to its real rows
before the GEMM (cheaper than masking to -inf, and with the same effect: they never enter the
softmax and get zero gradient). A shard made only of padding contributes nothing.

**Temperature.** Rollouts sample from ``softmax(z / temperature)``; the PPO ratio and the
train/rollout mismatch metrics must use the same distribution, so pass the sampling temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_rpt.errors import DataError


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax math runs in fp32, or in fp64 for fp64 inputs (exact reference checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tp_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(
    x: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None
) -> torch.Tensor:
    if _tp_size(group) > 1:
        x = x.contiguous()  # gloo silently corrupts non-contiguous tensors
        dist.all_reduce(x, op=op, group=group)
    return x


def _chunk_stats(
    z_CV: torch.Tensor,
    labels_C: torch.Tensor,
    vocab_start: int,
    compute_entropy: bool,
    group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-prob, log-sum-exp and entropy ``[C]`` of one chunk of fp32 local logits.

    ``z_CV`` is this rank's valid-vocab slice of the (temperature-scaled) logits; it is
    overwritten (shifted by the global row max) to save a ``[C, V/tp]`` buffer.
    """
    num_valid = z_CV.shape[1]
    if num_valid:
        max_C = z_CV.max(dim=1).values
    else:
        max_C = z_CV.new_full((z_CV.shape[0],), float("-inf"))
    max_C = _all_reduce(max_C, dist.ReduceOp.MAX, group)
    s_CV = z_CV.sub_(max_C.unsqueeze(1))
    local_C = labels_C - vocab_start
    owned_C = (local_C >= 0) & (local_C < num_valid)
    if num_valid:
        picked_C = s_CV.gather(1, local_C.clamp(0, num_valid - 1).unsqueeze(1)).squeeze(1)
        s_label_C = torch.where(owned_C, picked_C, torch.zeros_like(picked_C))
    else:
        s_label_C = torch.zeros_like(max_C)
    e_CV = torch.exp(s_CV)
    parts = [e_CV.sum(dim=1), s_label_C]
    if compute_entropy:
        parts.append(s_CV.mul_(e_CV).sum(dim=1))  # s is not needed after this
    sums_CK = _all_reduce(torch.stack(parts, dim=1), dist.ReduceOp.SUM, group)
    log_sum_exp_C = torch.log(sums_CK[:, 0])
    logprob_C = sums_CK[:, 1] - log_sum_exp_C
    if compute_entropy:
        entropy_C = log_sum_exp_C - sums_CK[:, 2] / sums_CK[:, 0]
    else:
        entropy_C = torch.zeros_like(logprob_C)
    return logprob_C, max_C + log_sum_exp_C, entropy_C


def _chunk_grad_logits(
    z_CV: torch.Tensor,
    labels_C: torch.Tensor,
    vocab_start: int,
    lse_C: torch.Tensor,
    grad_logprob_C: torch.Tensor | None,
    grad_entropy_C: torch.Tensor | None,
    entropy_C: torch.Tensor | None,
) -> torch.Tensor:
    """Gradient ``[C, V/tp]`` w.r.t. the fp32 local logits ``z_CV`` (overwritten in place)."""
    logp_CV = z_CV.sub_(lse_C.unsqueeze(1))
    p_CV = torch.exp(logp_CV)
    # grad_z = -p * (g_lp + g_H * (log p + H)), plus g_lp at the label.
    g_lp_C = grad_logprob_C if grad_logprob_C is not None else torch.zeros_like(lse_C)
    if grad_entropy_C is not None:
        assert entropy_C is not None
        coef_CV = logp_CV.add_(entropy_C.unsqueeze(1)).mul_(grad_entropy_C.unsqueeze(1))
        grad_CV = coef_CV.add_(g_lp_C.unsqueeze(1)).mul_(p_CV).neg_()
    else:
        grad_CV = p_CV.mul_(-g_lp_C.unsqueeze(1))
    if grad_logprob_C is not None and z_CV.shape[1]:
        local_C = labels_C - vocab_start
        owned_C = (local_C >= 0) & (local_C < z_CV.shape[1])
        # scatter (not boolean indexing): no host sync; rows this shard does not own add 0
        index_C1 = local_C.clamp(0, z_CV.shape[1] - 1).unsqueeze(1)
        grad_CV.scatter_add_(1, index_C1, (grad_logprob_C * owned_C).unsqueeze(1))
    return grad_CV


class _HiddenLogprobs(torch.autograd.Function):
    """Output layer + log-prob + entropy over vocab shards; recomputes logits in backward."""

    @staticmethod
    def forward(ctx, hidden_TH, weight_VH, labels_T, opts):  # noqa: ANN001, ANN205, D102
        w_vH = weight_VH[: opts.num_valid]
        T = hidden_TH.shape[0]
        logprob_T = hidden_TH.new_empty(T, dtype=_math_dtype(hidden_TH.dtype))
        lse_T = torch.empty_like(logprob_T)
        entropy_T = torch.empty_like(logprob_T) if opts.compute_entropy else logprob_T.new_empty(0)
        for s in range(0, T, opts.chunk_size):
            e = min(s + opts.chunk_size, T)
            z_CV = (hidden_TH[s:e] @ w_vH.t()).to(logprob_T.dtype)
            if opts.temperature != 1.0:
                z_CV.div_(opts.temperature)
            lp, lse, ent = _chunk_stats(
                z_CV, labels_T[s:e], opts.vocab_start, opts.compute_entropy, opts.tp_group
            )
            logprob_T[s:e], lse_T[s:e] = lp, lse
            if opts.compute_entropy:
                entropy_T[s:e] = ent
        ctx.opts = opts
        ctx.save_for_backward(hidden_TH, weight_VH, labels_T, lse_T, entropy_T)
        ctx.set_materialize_grads(False)
        if not opts.entropy_requires_grad:
            ctx.mark_non_differentiable(entropy_T)
        return logprob_T, entropy_T

    @staticmethod
    def backward(ctx, grad_logprob_T, grad_entropy_T):  # noqa: ANN001, ANN205, D102
        hidden_TH, weight_VH, labels_T, lse_T, entropy_T = ctx.saved_tensors
        opts = ctx.opts
        if not opts.entropy_requires_grad:
            grad_entropy_T = None
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_logprob_T is None and grad_entropy_T is None) or not (want_h or want_w):
            return None, None, None, None
        w_vH = weight_VH[: opts.num_valid]
        grad_h_TH = torch.zeros_like(hidden_TH) if want_h else None
        grad_w_VH = torch.zeros_like(weight_VH) if want_w else None
        # Accumulate the weight gradient over chunks in fp32: bf16 running sums would lose the
        # contributions of later chunks. For an fp32 weight the output buffer is used directly.
        md = _math_dtype(weight_VH.dtype)
        if want_w and weight_VH.dtype != md:
            grad_w_vH = torch.zeros(w_vH.shape, dtype=md, device=w_vH.device)
        elif want_w:
            grad_w_vH = grad_w_VH[: opts.num_valid]
        T = hidden_TH.shape[0]
        for s in range(0, T, opts.chunk_size):
            e = min(s + opts.chunk_size, T)
            h_CH = hidden_TH[s:e]
            z_CV = (h_CH @ w_vH.t()).to(md)
            if opts.temperature != 1.0:
                z_CV.div_(opts.temperature)
            grad_CV = _tempered_chunk_grad(
                z_CV, s, e, labels_T, lse_T, grad_logprob_T, grad_entropy_T, entropy_T, opts
            )
            grad_CV = grad_CV.to(weight_VH.dtype)
            if want_h:
                grad_h_TH[s:e] = grad_CV @ w_vH
            if want_w:
                if grad_w_vH.dtype == grad_CV.dtype:
                    grad_w_vH.addmm_(grad_CV.t(), h_CH)
                else:  # GEMM in the weight's dtype, running sum in fp32
                    grad_w_vH.add_(grad_CV.t() @ h_CH)
        if want_h and opts.reduce_hidden_grad:
            grad_h_TH = _all_reduce(grad_h_TH, dist.ReduceOp.SUM, opts.tp_group)
        if want_w and weight_VH.dtype != md:
            grad_w_VH[: opts.num_valid] = grad_w_vH
        return grad_h_TH, grad_w_VH, None, None


class _LogitsLogprobs(torch.autograd.Function):
    """Log-prob + entropy of existing vocab-parallel logits, chunked over tokens."""

    @staticmethod
    def forward(ctx, logits_TV, labels_T, opts):  # noqa: ANN001, ANN205, D102
        T = logits_TV.shape[0]
        logprob_T = logits_TV.new_empty(T, dtype=_math_dtype(logits_TV.dtype))
        lse_T = torch.empty_like(logprob_T)
        entropy_T = torch.empty_like(logprob_T) if opts.compute_entropy else logprob_T.new_empty(0)
        for s in range(0, T, opts.chunk_size):
            e = min(s + opts.chunk_size, T)
            z_CV = logits_TV[s:e, : opts.num_valid].to(logprob_T.dtype, copy=True)
            if opts.temperature != 1.0:
                z_CV.div_(opts.temperature)
            lp, lse, ent = _chunk_stats(
                z_CV, labels_T[s:e], opts.vocab_start, opts.compute_entropy, opts.tp_group
            )
            logprob_T[s:e], lse_T[s:e] = lp, lse
            if opts.compute_entropy:
                entropy_T[s:e] = ent
        ctx.opts = opts
        ctx.save_for_backward(logits_TV, labels_T, lse_T, entropy_T)
        ctx.set_materialize_grads(False)
        if not opts.entropy_requires_grad:
            ctx.mark_non_differentiable(entropy_T)
        return logprob_T, entropy_T

    @staticmethod
    def backward(ctx, grad_logprob_T, grad_entropy_T):  # noqa: ANN001, ANN205, D102
        logits_TV, labels_T, lse_T, entropy_T = ctx.saved_tensors
        opts = ctx.opts
        if not opts.entropy_requires_grad:
            grad_entropy_T = None
        if grad_logprob_T is None and grad_entropy_T is None:
            return None, None, None
        grad_TV = torch.zeros_like(logits_TV)
        md = lse_T.dtype
        for s in range(0, logits_TV.shape[0], opts.chunk_size):
            e = min(s + opts.chunk_size, logits_TV.shape[0])
            z_CV = logits_TV[s:e, : opts.num_valid].to(md, copy=True)
            if opts.temperature != 1.0:
                z_CV.div_(opts.temperature)
            grad_CV = _tempered_chunk_grad(
                z_CV, s, e, labels_T, lse_T, grad_logprob_T, grad_entropy_T, entropy_T, opts
            )
            grad_TV[s:e, : opts.num_valid] = grad_CV.to(logits_TV.dtype)
        return grad_TV, None, None


def _tempered_chunk_grad(z_CV, s, e, labels_T, lse_T, grad_logprob_T, grad_entropy_T, entropy_T, opts):  # noqa: ANN001, ANN202
    """d(loss)/d(raw logits) of rows [s, e): the tempered-logit gradient divided by T. [C, V/tp]"""
    md = z_CV.dtype
    grad_CV = _chunk_grad_logits(
        z_CV,
        labels_T[s:e],
        opts.vocab_start,
        lse_T[s:e],
        None if grad_logprob_T is None else grad_logprob_T[s:e].to(md),
        None if grad_entropy_T is None else grad_entropy_T[s:e].to(md),
        entropy_T[s:e] if grad_entropy_T is not None else None,
    )
    if opts.temperature != 1.0:
        grad_CV.div_(opts.temperature)
    return grad_CV


@dataclass(frozen=True)
class _Options:
    tp_group: dist.ProcessGroup | None
    vocab_start: int
    num_valid: int
    chunk_size: int
    compute_entropy: bool
    entropy_requires_grad: bool
    temperature: float
    reduce_hidden_grad: bool = True


def _shard_valid_rows(local_vocab: int, vocab_start: int, true_vocab_size: int | None) -> int:
    if true_vocab_size is None:
        return local_vocab
    return max(0, min(local_vocab, true_vocab_size - vocab_start))


def _check_inputs(labels_T: torch.Tensor, num_tokens: int, true_vocab_size: int | None,
                  chunk_size: int, temperature: float, tp_group: dist.ProcessGroup | None,
                  vocab_start: int) -> None:
    if labels_T.shape != (num_tokens,) or labels_T.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"labels_T must be an integer tensor of shape [{num_tokens}], got "
            f"{labels_T.dtype} {tuple(labels_T.shape)}"
        )
    if chunk_size < 1 or temperature <= 0:
        raise ValueError(f"chunk_size ({chunk_size}) and temperature ({temperature}) must be > 0")
    if tp_group is None and vocab_start != 0:
        raise ValueError("vocab_start must be 0 without a tp_group (the whole vocab is local)")
    if labels_T.numel() and true_vocab_size is not None:
        lo, hi = int(labels_T.min()), int(labels_T.max())
        if lo < 0 or hi >= true_vocab_size:
            raise DataError(
                f"labels_T holds token ids in [{lo}, {hi}], outside the vocabulary "
                f"[0, {true_vocab_size}): tokenizer and model do not match"
            )


def logprobs_from_hidden(
    hidden_TH: torch.Tensor,
    weight_VH: torch.Tensor,
    labels_T: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    true_vocab_size: int | None = None,
    chunk_size: int = 1024,
    compute_entropy: bool = True,
    entropy_requires_grad: bool = False,
    temperature: float = 1.0,
    reduce_hidden_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused output layer + log-prob + entropy: ``(logprobs [T], entropy [T] or None)``.

    Outputs are fp32 (fp64 for fp64 inputs) whatever the input dtype.

    Args:
        hidden_TH: final hidden states of the positions that predict response tokens
            ``[T, H]``, identical on every rank of ``tp_group``.
        weight_VH: this rank's rows of the output-layer weight ``[V/tp, H]`` (Megatron's
            ``output_layer.weight``, or the shared embedding weight when tied); same dtype as
            ``hidden_TH``.
        labels_T: the token each position predicts (global ids) ``[T]``.
        tp_group: tensor-parallel group over which the vocab is split (None: no TP).
        vocab_start: global id of this rank's first vocab row.
        true_vocab_size: ids >= this are padding rows and never enter the softmax
            (None: every row is real).
        chunk_size: tokens per chunk (bounds peak memory; any value gives the same result).
        compute_entropy: also return the per-token entropy.
        entropy_requires_grad: back-propagate through the entropy (only when the loss has an
            entropy term); otherwise the entropy is returned without grad.
        temperature: the sampling temperature; logits are divided by it.
        reduce_hidden_grad: sum the hidden-state gradient over ``tp_group`` here. Set False
            when the caller's own op already does (e.g. Megatron's
            ``gather_from_sequence_parallel_region`` with sequence parallelism, whose backward
            reduce-scatters).

    >>> g = torch.Generator().manual_seed(0)
    >>> h, w = torch.randn(5, 4, generator=g), torch.randn(7, 4, generator=g)
    >>> y = torch.tensor([0, 6, 2, 2, 5])
    >>> lp, ent = logprobs_from_hidden(h, w, y, chunk_size=2)
    >>> ref_lp, ref_ent = naive_logprobs_entropy(h, w, y)
    >>> bool(torch.allclose(lp, ref_lp, atol=1e-6) and torch.allclose(ent, ref_ent, atol=1e-6))
    True
    """
    if hidden_TH.dim() != 2 or weight_VH.dim() != 2 or hidden_TH.shape[1] != weight_VH.shape[1]:
        raise ValueError(
            f"hidden_TH {tuple(hidden_TH.shape)} and weight_VH {tuple(weight_VH.shape)} must "
            "be [T, H] and [V/tp, H]"
        )
    if hidden_TH.dtype != weight_VH.dtype:
        raise ValueError(f"hidden_TH is {hidden_TH.dtype} but weight_VH is {weight_VH.dtype}")
    _check_inputs(labels_T, hidden_TH.shape[0], true_vocab_size, chunk_size, temperature,
                  tp_group, vocab_start)
    opts = _Options(
        tp_group=tp_group,
        vocab_start=vocab_start,
        num_valid=_shard_valid_rows(weight_VH.shape[0], vocab_start, true_vocab_size),
        chunk_size=chunk_size,
        compute_entropy=compute_entropy,
        entropy_requires_grad=compute_entropy and entropy_requires_grad,
        temperature=float(temperature),
        reduce_hidden_grad=reduce_hidden_grad,
    )
    logprob_T, entropy_T = _HiddenLogprobs.apply(hidden_TH, weight_VH, labels_T.long(), opts)
    return logprob_T, (entropy_T if compute_entropy else None)


def logprobs_from_logits(
    logits_TV: torch.Tensor,
    labels_T: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    true_vocab_size: int | None = None,
    chunk_size: int = 1024,
    compute_entropy: bool = True,
    entropy_requires_grad: bool = False,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob and entropy ``[T]`` of existing vocab-parallel logits ``[T, V/tp]``.

    For when the model already produced logits (e.g. Megatron's own output layer). The
    ``[T, V/tp]`` input and its gradient exist anyway; chunking bounds the fp32 softmax
    temporaries. Arguments as in ``logprobs_from_hidden``.
    """
    if logits_TV.dim() != 2:
        raise ValueError(f"logits_TV must be [T, V/tp], got {tuple(logits_TV.shape)}")
    _check_inputs(labels_T, logits_TV.shape[0], true_vocab_size, chunk_size, temperature,
                  tp_group, vocab_start)
    opts = _Options(
        tp_group=tp_group,
        vocab_start=vocab_start,
        num_valid=_shard_valid_rows(logits_TV.shape[1], vocab_start, true_vocab_size),
        chunk_size=chunk_size,
        compute_entropy=compute_entropy,
        entropy_requires_grad=compute_entropy and entropy_requires_grad,
        temperature=float(temperature),
    )
    logprob_T, entropy_T = _LogitsLogprobs.apply(logits_TV, labels_T.long(), opts)
    return logprob_T, (entropy_T if compute_entropy else None)


def naive_logprobs_entropy(
    hidden_TH: torch.Tensor,
    weight_VH: torch.Tensor,
    labels_T: torch.Tensor,
    *,
    true_vocab_size: int | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: full fp32 logits ``[T, V]`` of the whole (unsharded) weight, plain autograd.

    Used by the tests and the benchmark; it materialises everything the fused path avoids.
    """
    v = weight_VH.shape[0] if true_vocab_size is None else true_vocab_size
    logits_TV = (hidden_TH @ weight_VH[:v].t()).to(_math_dtype(hidden_TH.dtype)) / temperature
    logp_TV = torch.log_softmax(logits_TV, dim=-1)
    logprob_T = logp_TV.gather(1, labels_T.long().unsqueeze(1)).squeeze(1)
    entropy_T = -(logp_TV.exp() * logp_TV).sum(dim=-1)
    return logprob_T, entropy_T


@dataclass(frozen=True)
class ResponseIndex:
    """Where the response tokens of a packed batch are, for slicing before the output layer.

    ``positions_T`` index the packed hidden states whose output *predicts* a response token;
    ``label_positions_T = positions_T + 1`` index that token in the packed input ids;
    ``seq_ids_T`` give the sequence (0..S-1) of each.
    """

    positions_T: torch.Tensor
    label_positions_T: torch.Tensor
    seq_ids_T: torch.Tensor


def response_positions(
    cu_seqlens_S1: torch.Tensor,
    prompt_lens_S: torch.Tensor,
    seq_lens_S: torch.Tensor | None = None,
) -> ResponseIndex:
    """Packed positions whose next token is a response token (the off-by-one of causal LMs).

    A causal LM's output at position j predicts token j + 1. Sequence s occupies packed slots
    ``[cu[s], cu[s] + len_s)``: its prompt (context) is the first ``P_s`` tokens and its
    response the rest, so its response tokens sit at ``cu[s] + P_s .. cu[s] + len_s - 1`` and
    are predicted by positions ``cu[s] + P_s - 1 .. cu[s] + len_s - 2``. The last position of
    each sequence predicts nothing we train on; context positions carry no loss in RPT, so
    only these positions go through the output layer.

    Args:
        cu_seqlens_S1: ``[S + 1]`` start offsets of the sequences in the packed buffer
            (Megatron's ``cu_seqlens``, or ``cu_seqlens_padded`` when sequences are padded).
        prompt_lens_S: ``[S]`` prompt tokens of each sequence (>= 1: the first token has no
            predecessor).
        seq_lens_S: ``[S]`` real tokens of each sequence (prompt + response, no padding);
            default ``diff(cu_seqlens_S1)``.

    >>> idx = response_positions(torch.tensor([0, 5, 8]), torch.tensor([3, 1]))
    >>> idx.positions_T.tolist(), idx.label_positions_T.tolist(), idx.seq_ids_T.tolist()
    ([2, 3, 5, 6], [3, 4, 6, 7], [0, 0, 1, 1])
    """
    cu_S1 = cu_seqlens_S1.long()
    slots_S = cu_S1[1:] - cu_S1[:-1]
    seq_lens_S = slots_S if seq_lens_S is None else seq_lens_S.long()
    prompt_lens_S = prompt_lens_S.long()
    if not (prompt_lens_S.shape == seq_lens_S.shape == slots_S.shape):
        raise ValueError(
            f"cu_seqlens {tuple(cu_S1.shape)}, prompt_lens {tuple(prompt_lens_S.shape)} and "
            f"seq_lens {tuple(seq_lens_S.shape)} must describe the same number of sequences"
        )
    if (prompt_lens_S < 1).any() or (prompt_lens_S > seq_lens_S).any() or (
        seq_lens_S > slots_S
    ).any():
        raise ValueError("need 1 <= prompt_len <= seq_len <= cu_seqlens slot for every sequence")
    resp_S = seq_lens_S - prompt_lens_S
    seq_ids_T = torch.repeat_interleave(torch.arange(len(resp_S), device=cu_S1.device), resp_S)
    first_S = cu_S1[:-1] + prompt_lens_S - 1
    offset_S = torch.cumsum(resp_S, 0) - resp_S  # where each sequence's run starts in T
    within_T = torch.arange(int(resp_S.sum()), device=cu_S1.device) - offset_S[seq_ids_T]
    positions_T = first_S[seq_ids_T] + within_T
    return ResponseIndex(positions_T, positions_T + 1, seq_ids_T)


def shared_prefix_response_positions(
    first_predictor_S: torch.Tensor,
    response_start_S: torch.Tensor,
    response_lens_S: torch.Tensor,
) -> ResponseIndex:
    """Positions predicting response tokens when a response need not follow its context.

    In the shared-prefix layout (model/shared_prefix.py) the G responses of a group sit one
    after another behind ONE copy of the context. Response s occupies packed slots
    ``[start_s, start_s + R_s)``. Its first token is predicted by the context's last slot
    ``first_predictor_S[s]``, which all G responses of the group share (the loss gathers that
    hidden state G times, with G different labels; autograd sums the gradients); its token
    ``k >= 1`` is predicted by slot ``start_s + k - 1``, as usual. The last slot of every
    response predicts nothing we train on.

    Args:
        first_predictor_S: ``[S]`` slot of the last context token of each response's group.
        response_start_S: ``[S]`` first slot of each response.
        response_lens_S: ``[S]`` response tokens (>= 1).

    >>> # ctx in slots 0-2, r_1 in 3-4, r_2 in 5-7
    >>> idx = shared_prefix_response_positions(
    ...     torch.tensor([2, 2]), torch.tensor([3, 5]), torch.tensor([2, 3]))
    >>> idx.positions_T.tolist(), idx.label_positions_T.tolist(), idx.seq_ids_T.tolist()
    ([2, 3, 2, 5, 6], [3, 4, 5, 6, 7], [0, 0, 1, 1, 1])
    """
    first_S, start_S, lens_S = (
        t.long() for t in (first_predictor_S, response_start_S, response_lens_S)
    )
    if not (first_S.shape == start_S.shape == lens_S.shape) or first_S.dim() != 1:
        raise ValueError("first_predictor_S, response_start_S and response_lens_S must be [S]")
    if (lens_S < 1).any() or (first_S >= start_S).any():
        raise ValueError("need R >= 1 and the context before its responses for every response")
    seq_ids_T = torch.repeat_interleave(torch.arange(len(lens_S), device=lens_S.device), lens_S)
    offset_S = torch.cumsum(lens_S, 0) - lens_S
    within_T = torch.arange(int(lens_S.sum()), device=lens_S.device) - offset_S[seq_ids_T]
    label_positions_T = start_S[seq_ids_T] + within_T
    positions_T = torch.where(within_T == 0, first_S[seq_ids_T], label_positions_T - 1)
    return ResponseIndex(positions_T, label_positions_T, seq_ids_T)
