"""The ``forward_step`` / ``loss_func`` pair that Megatron's pipeline schedules call.

``get_forward_backward_func()`` runs ``forward_step(data_iterator, model)`` once per
micro-batch on every pipeline stage; on the last stage it then calls the returned
``loss_func(output)`` and back-propagates what it returns. Here:

* ``forward_step`` takes the next ``MicroBatch``, runs the (DDP-wrapped) ``RPTGPTModel`` chunk
  on its tokens (packed: with ``PackedSeqParams``, qkv_format thd; shared_prefix: with
  ``SharedPrefixParams``, model/shared_prefix.py) and returns the chunk's
  output (the hidden states to send on, or on the last stage the final hidden states
  ``[S, B, H]``) with ``partial(loss_func, micro_batch)``.
* ``loss_func`` selects the hidden states of the positions that predict response tokens,
  computes their log-probs and entropy with the fused vocab-parallel output layer
  (``logprobs_from_hidden``, with the sampling temperature and the padded vocabulary rows
  excluded) and the policy loss with the *global* denominators of the batch.

**Loss scaling contract** (Megatron-Core 0.16.1, ``TransformerConfig.calculate_per_token_loss
= True``, set by model/build.py):

* ``schedules.forward_step_calc_loss`` leaves a 3-tuple loss untouched (without the flag it
  would divide by the micro-batch's token count and by ``num_microbatches``);
* ``DistributedDataParallel`` then *sums* gradients over DP (``gradient_scaling_factor = 1``)
  instead of averaging them;
* ``finalize_model_grads`` would divide the gradients by the summed ``num_tokens`` of all
  micro-batches and DP ranks: ``trainer/optimizer.py`` installs it with ``num_tokens=None``.

So the gradient is exactly the gradient of (sum over micro-batches and DP ranks of the losses
returned here), and each of those already carries the global-batch denominator: the full-batch
loss, whatever the layout or micro-batch split. With context parallelism DDP sums over the
data x context-parallel group, and each CP rank's loss covers only the response tokens it
predicts (trainer/context_parallel.py): the sum is still the full-batch loss, counted once. No multiply-then-divide is involved (NeMo-RL
instead multiplies by num_microbatches x dp_size to cancel Megatron's averaging).

Letters: T response tokens of the micro-batch, H hidden size, S sequence, B rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from megatron_rpt.loss.config import LossConfig
from megatron_rpt.loss.logprobs import logprobs_from_hidden
from megatron_rpt.loss.policy_loss import mismatch_metrics, policy_loss
from megatron_rpt.model.parameters import unwrap_model
from megatron_rpt.model.shared_prefix import SharedPrefixParams
from megatron_rpt.trainer.batch import MicroBatch


@dataclass(frozen=True)
class LossContext:
    """Everything ``loss_func`` needs besides the micro-batch (fixed for a run)."""

    loss: LossConfig
    tp_group: Any
    tp_rank: int
    true_vocab_size: int
    temperature: float
    global_num_tokens: float
    global_num_seqs: float
    device: torch.device


def packed_seq_params(mb: MicroBatch) -> Any:
    """Megatron ``PackedSeqParams`` of a packed micro-batch already on its device: thd
    segments, or ``SharedPrefixParams`` for the shared-prefix layout."""
    from megatron.core.packed_seq_params import PackedSeqParams

    if mb.shared_prefix:
        return SharedPrefixParams.from_pieces(mb.pieces, device=mb.tokens.device)

    # Context parallelism: whole-row real lengths and padded offsets; TE's attention and
    # Megatron's RoPE locate this rank's chunks of each segment from the padded offsets.
    padded = mb.cu_seqlens_padded
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=mb.cu_seqlens,
        cu_seqlens_kv=mb.cu_seqlens,
        cu_seqlens_q_padded=padded,
        cu_seqlens_kv_padded=padded,
        max_seqlen_q=mb.max_seqlen,
        max_seqlen_kv=mb.max_seqlen,
    )


def run_model(model: torch.nn.Module, mb: MicroBatch) -> torch.Tensor:
    """One chunk's forward on a micro-batch (already on the model's device)."""
    from megatron.core.transformer.module import Float16Module

    kwargs: dict[str, Any] = {}
    if mb.packed:
        kwargs["packed_seq_params"] = packed_seq_params(mb)
    if _find_wrapper(model, Float16Module) is not None:
        # Keep the last stage's hidden states in the model dtype: the fused output layer
        # multiplies them with the (bf16) output weight; upcasting first would only copy.
        kwargs["fp32_output"] = False
    return model(mb.tokens, mb.position_ids, None, **kwargs)


def _find_wrapper(model: torch.nn.Module, cls: type) -> torch.nn.Module | None:
    while True:
        if isinstance(model, cls):
            return model
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return None
        model = inner


def forward_step(
    data_iterator: Iterator[MicroBatch], model: torch.nn.Module, *, ctx: LossContext
) -> tuple[torch.Tensor, Any]:
    """Megatron's ``forward_step_func`` for training (returns ``(output, loss_func)``)."""
    mb = next(data_iterator).to(ctx.device)
    output = run_model(model, mb)
    return output, partial(loss_func, mb=mb, model=model, ctx=ctx)


def logprob_step(
    data_iterator: Iterator[MicroBatch], model: torch.nn.Module, *, ctx: LossContext
) -> tuple[torch.Tensor, Any]:
    """``forward_step_func`` for forward-only log-prob/entropy computation."""
    mb = next(data_iterator).to(ctx.device)
    output = run_model(model, mb)
    return output, partial(logprob_func, mb=mb, model=model, ctx=ctx)


def response_logprobs(
    hidden_SBH: torch.Tensor,
    mb: MicroBatch,
    model: torch.nn.Module,
    ctx: LossContext,
    *,
    entropy_requires_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropy ``[T]`` (fp32) of the response tokens of ``mb``.

    With sequence parallelism ``hidden_SBH`` is this rank's ``[S/tp, B, H]``: it is gathered
    first; the gather's backward reduce-scatters the hidden-state gradient, which therefore is
    not also summed over TP inside ``logprobs_from_hidden``.
    """
    rpt_model = unwrap_model(model)
    weight_vH = rpt_model.output_weight()
    sequence_parallel = ctx.tp_group is not None and rpt_model.config.sequence_parallel
    if sequence_parallel:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        hidden_SBH = gather_from_sequence_parallel_region(
            hidden_SBH, tensor_parallel_output_grad=True, group=ctx.tp_group
        )
    hidden_TH = hidden_SBH.reshape(-1, hidden_SBH.shape[-1]).index_select(0, mb.hidden_index_T)
    logprobs_T, entropy_T = logprobs_from_hidden(
        hidden_TH,
        weight_vH,
        mb.labels_T,
        tp_group=ctx.tp_group,
        vocab_start=ctx.tp_rank * weight_vH.shape[0],
        true_vocab_size=ctx.true_vocab_size,
        chunk_size=ctx.loss.logprob_chunk_size,
        compute_entropy=True,
        entropy_requires_grad=entropy_requires_grad,
        temperature=ctx.temperature,
        reduce_hidden_grad=not sequence_parallel,
    )
    assert entropy_T is not None
    return logprobs_T, entropy_T


def loss_func(
    hidden_SBH: torch.Tensor, *, mb: MicroBatch, model: torch.nn.Module, ctx: LossContext
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, num_tokens, metrics)``: this micro-batch's share of the global-batch loss.

    ``num_tokens`` is informational (``finalize_model_grads`` gets None, see the module
    docstring); metrics are additive sums/counts/extrema (``megatron_rpt.loss.metrics``).
    """
    logprobs_T, entropy_T = response_logprobs(
        hidden_SBH, mb, model, ctx, entropy_requires_grad=ctx.loss.entropy_coef != 0
    )
    loss, metrics = policy_loss(
        logprobs_T,
        mb.advantages_T,
        mb.loss_mask_T,
        cfg=ctx.loss,
        old_logprobs_T=mb.old_logprobs_T,
        rollout_logprobs_T=mb.rollout_logprobs_T,
        ref_logprobs_T=mb.ref_logprobs_T,
        entropy_T=entropy_T,
        global_num_tokens=ctx.global_num_tokens,
        global_num_seqs=ctx.global_num_seqs,
        seq_ids_T=mb.response.seq_ids_T,
        seq_token_counts_S=mb.seq_token_counts_S,
    )
    mismatch = mismatch_metrics(
        logprobs_T,
        mb.rollout_logprobs_T,
        mb.loss_mask_T,
        ratio_threshold=ctx.loss.mismatch_ratio_threshold,
    )
    mismatch.pop("num_tokens")  # the same mask: already counted by policy_loss
    metrics.update(mismatch)
    num_tokens = torch.tensor(int(mb.loss_mask_T.sum()), dtype=torch.int)
    return loss, num_tokens, metrics


def logprob_func(
    hidden_SBH: torch.Tensor, *, mb: MicroBatch, model: torch.nn.Module, ctx: LossContext
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Forward-only: the micro-batch's log-probs and entropy, keyed for reassembly."""
    logprobs_T, entropy_T = response_logprobs(hidden_SBH, mb, model, ctx)
    zero = hidden_SBH.new_zeros((), dtype=torch.float32)
    out = {
        "logprobs_T": logprobs_T.detach().cpu(),
        "entropy_T": entropy_T.detach().cpu(),
        "seq_ids_T": mb.response.seq_ids_T.cpu(),
        "seq_indices": mb.seq_indices,
        "cp_token_index_T": _cpu(mb.cp_token_index_T),
        "seq_token_counts_S": _cpu(mb.seq_token_counts_S),
    }
    return zero, torch.tensor(0, dtype=torch.int), out


def _cpu(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.cpu()


__all__ = [
    "LossContext",
    "forward_step",
    "logprob_func",
    "logprob_step",
    "loss_func",
    "packed_seq_params",
    "response_logprobs",
    "run_model",
]
