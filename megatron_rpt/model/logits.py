"""Logits with the vocabulary padding removed, and a forward pass through the pipeline schedule.

Megatron's embedding and output layer have ``P >= V`` rows (vocabulary padded for TP and
efficiency, model/build.py). The padding rows are not tokens: their logits (0 at
initialisation, anything after training) must never reach a softmax, a sampler or an export.
Every consumer of logits goes through one of:

* ``mask_padded_vocab(logits_BSv, vocab, tp_rank, tp_size)``: vocab-parallel logits (this
  rank's ``P/tp`` columns) with padding columns set to -inf, for TP-sharded softmax /
  log-prob / entropy code;
* ``true_vocab_logits(logits_BSP, vocab)``: full logits sliced to the ``V`` real columns.

``forward_logits`` runs Megatron's own forward-only pipeline schedule (any TP/PP/VPP) and
returns full-vocabulary ``[B, S, V]`` fp32 logits on the last pipeline stage.

Shape letters: B batch, S sequence, V true vocabulary, P padded vocabulary, v = P / TP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from megatron_rpt import patches
from megatron_rpt.distributed import ParallelGroups
from megatron_rpt.model.build import BuiltModel, VocabSizes


def mask_padded_vocab(
    logits_BSv: torch.Tensor, vocab: VocabSizes, tp_rank: int, tp_size: int
) -> torch.Tensor:
    """Copy of vocab-parallel logits with global columns >= ``vocab.true`` set to -inf.

    >>> sizes = VocabSizes(true=5, padded=8)
    >>> mask_padded_vocab(torch.zeros(1, 1, 4), sizes, tp_rank=1, tp_size=2).tolist()
    [[[0.0, -inf, -inf, -inf]]]
    """
    local = logits_BSv.shape[-1]
    assert local * tp_size == vocab.padded, (local, tp_size, vocab)
    first = tp_rank * local
    n_real = min(max(vocab.true - first, 0), local)
    if n_real == local:
        return logits_BSv
    out = logits_BSv.clone()
    out[..., n_real:] = float("-inf")
    return out


def true_vocab_logits(logits_BSP: torch.Tensor, vocab: VocabSizes) -> torch.Tensor:
    """Full-vocabulary logits restricted to the real tokens: ``[..., P] -> [..., V]``."""
    assert logits_BSP.shape[-1] == vocab.padded, (logits_BSP.shape, vocab)
    return logits_BSP[..., : vocab.true]


def gather_vocab_parallel(logits_BSv: torch.Tensor, tp_group: Any, tp_size: int) -> torch.Tensor:
    """All-gather TP vocabulary shards: ``[B, S, P/tp] -> [B, S, P]`` (contiguous for gloo)."""
    if tp_size == 1:
        return logits_BSv
    local = logits_BSv.contiguous()
    parts = [torch.empty_like(local) for _ in range(tp_size)]
    dist.all_gather(parts, local, group=tp_group)
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def forward_logits(
    built: BuiltModel, tokens_BS: torch.Tensor, groups: ParallelGroups
) -> torch.Tensor | None:
    """Fp32 ``[B, S, V]`` logits of ``tokens_BS`` on the last pipeline stage (None elsewhere).

    Every rank of the model-parallel group must call this with the same tokens. Positions are
    ``0..S-1``; attention is causal (no padding mask); dropout is off (eval mode) during the
    call and each chunk's train/eval mode is restored afterwards.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = tokens_BS.shape
    # The interleaved (virtual pipeline) schedule needs several microbatches; use size-1 ones.
    micro = 1 if groups.vpp_size else batch
    if batch % micro or (groups.vpp_size and batch % groups.pp_size):
        raise ValueError(
            f"batch {batch} must be a multiple of PP={groups.pp_size} with virtual stages"
        )
    position_ids_bS = torch.arange(seq, device=tokens_BS.device).expand(micro, seq)
    microbatches = list(tokens_BS.split(micro))

    def forward_step(data_iterator, model):  # noqa: ANN001, ANN202 - Megatron's protocol
        tokens = next(data_iterator)
        return model(tokens, position_ids_bS, None), None  # loss_func None: keep the output

    was_training = [chunk.training for chunk in built.chunks]
    for chunk in built.chunks:
        chunk.eval()
    with patches.cuda_device_mode(), _logits_output(built.chunks):
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(microbatches) for _ in built.chunks],
            model=built.chunks,
            num_microbatches=len(microbatches),
            seq_length=seq,
            micro_batch_size=micro,
            forward_only=True,
        )
    for chunk, mode in zip(built.chunks, was_training, strict=True):
        chunk.train(mode)
    if not groups.is_last_stage:
        return None
    logits_BSv = torch.cat([o.float() for o in outputs], dim=0)
    logits_BSP = gather_vocab_parallel(logits_BSv, groups.tp_group, groups.tp_size)
    return true_vocab_logits(logits_BSP, built.vocab).contiguous()


@contextlib.contextmanager
def _logits_output(chunks: list[torch.nn.Module]) -> Iterator[None]:
    """Trainer chunks (``RPTGPTModel``, hidden-state output) return logits for the duration."""
    switched = []
    for chunk in chunks:
        module = chunk
        while isinstance(getattr(module, "module", None), torch.nn.Module):
            module = module.module
        if getattr(module, "output_hidden_states", False):
            module.output_hidden_states = False
            switched.append(module)
    try:
        yield
    finally:
        for module in switched:
            module.output_hidden_states = True
