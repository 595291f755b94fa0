"""One on-policy policy-gradient update of a Megatron ``GPTModel`` under any TP/PP/DP layout.

``PolicyTrainer`` owns this rank's DDP-wrapped ``RPTGPTModel`` chunks, the Megatron optimizer and
LR scheduler. ``train_step(batch)``:

1. plans the global ``RolloutBatch`` (same plan on every rank, trainer/batch.py): DP partition,
   token-budget micro-batches, padding micro-batches so every DP rank runs the same count;
   with context parallelism (CP > 1: packed layout, TE spec) each micro-batch is then split
   over the CP ranks (trainer/context_parallel.py);
2. runs Megatron's ``get_forward_backward_func()`` (1F1B / interleaved / no pipelining) with
   trainer/forward.py's ``forward_step`` (loss on the last stage, global denominators);
3. ``optimizer.step()`` (grad norm over all shards, clipping, update; DP reduce-scatter /
   all-gather for the distributed optimizer), then the LR scheduler;
4. reduces the metrics over micro-batches and DP (x CP) on the last stage and broadcasts them
   over the pipeline, so every rank returns the same ``StepMetrics``.

``compute_logprobs(batch)`` is the forward-only counterpart (old / reference log-probs and
mismatch checks): per-sequence fp32 log-probs (and entropies) of the response tokens under the
current weights, identical on every rank.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from megatron_rpt import capabilities, patches
from megatron_rpt.distributed import ParallelGroups
from megatron_rpt.errors import ConfigError
from megatron_rpt.loss.config import LossConfig
from megatron_rpt.loss.metrics import accumulate_metrics, all_reduce_metrics, finalize_metrics
from megatron_rpt.model.build import BuiltModel
from megatron_rpt.model.config import ModelConfig, ParallelConfig, PrecisionConfig
from megatron_rpt.model.fp8 import token_alignment
from megatron_rpt.model.parameters import unwrap_model
from megatron_rpt.model.rpt_gpt import RPTGPTModel
from megatron_rpt.trainer import optimizer as optim
from megatron_rpt.trainer.batch import (
    BatchPlan,
    MicroBatch,
    RolloutBatch,
    _pad_micro_batch,
    pad_to_common_shape,
    plan_batch,
    rank_micro_batches,
)
from megatron_rpt.trainer.config import (
    OptimizerConfig,
    TrainConfig,
    check_interleaved_schedule,
    resolve_layout,
)
from megatron_rpt.trainer.context_parallel import padded_width, split_micro_batch
from megatron_rpt.trainer.cp_gather import gather_response_values
from megatron_rpt.trainer.forward import LossContext, forward_step, logprob_step
from megatron_rpt.trainer.metrics import StepMetrics, batch_statistics

logger = logging.getLogger(__name__)


class PolicyTrainer:
    """This rank's model chunks (Megatron DDP), optimizer, scheduler and step counter."""

    def __init__(
        self,
        built: BuiltModel,
        groups: ParallelGroups,
        *,
        optimizer: OptimizerConfig,
        train: TrainConfig,
        loss: LossConfig,
        temperature: float,
    ) -> None:
        """Wrap ``built`` (from ``build_pretrained(..., output='hidden')``) for training.

        ``temperature`` is the rollout sampling temperature (log-probs use the same
        distribution as the sampler).
        """
        _check_model(built, groups, temperature)
        self.layout = resolve_layout(train.micro_batch_layout, built.spec)
        """The micro-batch layout in use (``train.micro_batch_layout`` with 'auto' resolved)."""
        logger.info("micro-batch layout: %s (train.micro_batch_layout=%s, %s layer spec)",
                    self.layout, train.micro_batch_layout, built.spec)  # fmt: skip
        if built.config.context_parallel_size > 1:
            _check_context_parallel(built, self.layout, groups)
        if self.layout == "shared_prefix":
            _check_shared_prefix(built)
        self.built, self.groups = built, groups
        self.opt_cfg, self.train_cfg, self.loss_cfg = optimizer, train, loss
        self.temperature = float(temperature)
        self.chunks = optim.wrap_ddp(built.chunks, built.config, groups, optimizer)
        self.optimizer = optim.build_optimizer(self.chunks, optimizer, groups, built.dtype)
        self.scheduler = optim.build_scheduler(self.optimizer, optimizer, train.steps)
        optim.attach_to_schedules(built.config, self.chunks, self.optimizer, optimizer)
        self.step = 0
        """Optimizer steps completed."""
        self.device = next(self.chunks[0].parameters()).device
        self.token_alignment = math.lcm(
            token_alignment(built.config), groups.tp_size if built.config.sequence_parallel else 1
        )
        """Micro-batch token counts are padded to a multiple of this (FP8 GEMMs: 16 or 32;
        sequence parallelism: TP, the rows are split over the TP ranks)."""

    @classmethod
    def from_config(
        cls,
        groups: ParallelGroups,
        *,
        model: ModelConfig,
        parallel: ParallelConfig,
        precision: PrecisionConfig,
        optimizer: OptimizerConfig,
        train: TrainConfig,
        loss: LossConfig,
        temperature: float,
    ) -> PolicyTrainer:
        """Build the model from ``model`` / ``parallel`` / ``precision`` and wrap it.

        Initial weights come from ``model.hf_path`` or ``model.megatron_checkpoint``; resume
        from a training checkpoint with ``trainer.checkpoint.load_training_checkpoint``.
        ``loss`` comes from a resolved config (``megatron_rpt.config.resolve`` decides
        ``loss.tis``); ``temperature`` is the sampling temperature (1 for NTP).
        """
        from megatron_rpt.checkpoint.loading import build_pretrained

        if loss.tis is None:
            raise ConfigError(
                "loss.tis=None (auto) is decided by megatron_rpt.config.resolve(cfg) from the "
                "precision settings; resolve the config before building the PolicyTrainer"
            )
        built = build_pretrained(model, parallel, groups, output="hidden", precision=precision)
        return cls(
            built, groups, optimizer=optimizer, train=train, loss=loss, temperature=temperature
        )

    # ------------------------------------------------------------------ public API

    def train_step(self, batch: RolloutBatch) -> StepMetrics:
        """One optimizer step on the global batch (collective over all ranks)."""
        start = time.perf_counter()
        plan, micro_batches = self._micro_batches(batch)
        for chunk in self.chunks:
            chunk.train()
        optim.zero_grads(self.chunks, self.optimizer)
        outputs = self._run_schedule(forward_step, micro_batches, batch, forward_only=False)
        success, grad_norm, lr = optim.optimizer_step(self.optimizer, self.scheduler)
        train_metrics = self._reduce_metrics(outputs)
        self.step += 1
        stats = batch_statistics(batch.sequences)
        stats["micro_batches"] = float(len(micro_batches))
        stats["layout_tokens"] = float(plan.layout_tokens)
        metrics = StepMetrics(
            step=self.step,
            loss=train_metrics.pop("loss"),
            grad_norm=grad_norm,
            lr=lr,
            update_successful=success,
            train=train_metrics,
            batch=stats,
            time_s={"train": time.perf_counter() - start},
        )
        if not success:
            logger.warning(
                "step %d: optimizer skipped the update (grad norm %s)", self.step, grad_norm
            )
        return metrics

    @torch.no_grad()
    def compute_logprobs(
        self,
        batch: RolloutBatch,
        *,
        return_entropy: bool = False,
        temperature: float | None = None,
    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """fp32 log-probs ``[R]`` of each sequence's response tokens (batch order), every rank.

        Uses the sampling temperature (or ``temperature``, e.g. 1 for the model's own
        distribution) and the current weights, in eval mode (no dropout). With
        ``return_entropy`` also the per-token entropies.
        """
        _, micro_batches = self._micro_batches(batch)
        modes = [chunk.training for chunk in self.chunks]
        for chunk in self.chunks:
            chunk.eval()
        try:
            outputs = self._run_schedule(
                logprob_step, micro_batches, batch, forward_only=True, temperature=temperature
            )
        finally:
            for chunk, mode in zip(self.chunks, modes, strict=True):
                chunk.train(mode)
        flat_2N = self._gather_logprobs(outputs, batch)
        lengths = [s.response_ids.numel() for s in batch.sequences]
        logprobs = list(flat_2N[0].split(lengths))
        if return_entropy:
            return logprobs, list(flat_2N[1].split(lengths))
        return logprobs

    def finish_param_sync(self) -> None:
        """Complete a deferred parameter all-gather (``overlap_param_gather``) now.

        Call before reading the weights outside a forward pass (checkpoint, export, sync).
        """
        if self.opt_cfg.overlap_param_gather:
            for chunk in self.chunks:
                chunk.start_param_sync(force_sync=True)

    @property
    def model_modules(self) -> list[torch.nn.Module]:
        """The unwrapped ``RPTGPTModel`` chunks (no DDP / Float16Module)."""
        return [unwrap_model(chunk) for chunk in self.chunks]

    # ------------------------------------------------------------------ internals

    def _micro_batches(self, batch: RolloutBatch) -> tuple[BatchPlan, list[MicroBatch]]:
        g = self.groups
        plan = plan_batch(
            batch,
            g.dp_size,
            self.train_cfg.max_tokens_per_microbatch,
            self.layout,
            # The interleaved schedule needs a multiple of the pipeline size.
            multiple_of=g.pp_size if g.vpp_size else 1,
        )
        micro_batches = rank_micro_batches(batch, plan, g.dp_rank, self.layout)
        if g.cp_size > 1:
            return plan, self._split_for_cp(micro_batches)
        if self.token_alignment > 1:
            micro_batches = [_align_width(mb, self.token_alignment) for mb in micro_batches]
        if not self.built.config.variable_seq_lengths and g.pp_size > 1:
            # Fixed-shape p2p (the interleaved schedule): one shape for the whole step.
            micro_batches = pad_to_common_shape(micro_batches)
        return plan, micro_batches

    def _split_for_cp(self, micro_batches: list[MicroBatch]) -> list[MicroBatch]:
        """This CP rank's part of each micro-batch (trainer/context_parallel.py).

        Segments are padded to a multiple of 2 x CP (x TP with sequence parallelism: the rows
        are split over TP after CP); this rank's row to a multiple of ``token_alignment``.
        """
        g = self.groups
        sp = self.built.config.sequence_parallel
        seq_multiple = 2 * g.cp_size * (g.tp_size if sp else 1)
        min_width = 0
        if not self.built.config.variable_seq_lengths and g.pp_size > 1:
            # Fixed-shape p2p (the interleaved schedule): one shape for the whole step.
            min_width = max(
                padded_width(mb, g.cp_size, seq_multiple, self.token_alignment)
                for mb in micro_batches
            )
        return [
            split_micro_batch(
                mb,
                g.cp_size,
                g.cp_rank,
                seq_multiple=seq_multiple,
                width_multiple=self.token_alignment,
                min_width=min_width,
            )
            for mb in micro_batches
        ]

    def _context(self, batch: RolloutBatch, temperature: float | None = None) -> LossContext:
        return LossContext(
            loss=self.loss_cfg,
            tp_group=self.groups.tp_group if self.groups.tp_size > 1 else None,
            tp_rank=self.groups.tp_rank,
            true_vocab_size=self.built.vocab.true,
            temperature=self.temperature if temperature is None else temperature,
            global_num_tokens=float(batch.global_num_tokens),
            global_num_seqs=float(batch.global_num_seqs),
            device=self.device,
        )

    def _run_schedule(
        self,
        step_fn: Any,
        micro_batches: list[MicroBatch],
        batch: RolloutBatch,
        *,
        forward_only: bool,
        temperature: float | None = None,
    ) -> list[Any]:
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        g = self.groups
        schedule = get_forward_backward_func(pp_size=g.pp_size, vp_size=g.vpp_size)
        iterators = [iter(micro_batches) for _ in self.chunks]
        kwargs: dict[str, Any] = {}
        if g.pp_size > 1:
            kwargs["p2p_communicator"] = P2PCommunicator(
                pp_group=g.pp_group, config=self.built.config
            )
        # With variable_seq_lengths (model/build.py) the stages exchange each micro-batch's
        # shape and these two are placeholders; otherwise all micro-batches have this shape.
        seq_length = max(mb.tokens.shape[1] for mb in micro_batches)
        micro_batch_size = max(mb.tokens.shape[0] for mb in micro_batches)
        with patches.cuda_device_mode():
            return schedule(
                forward_step_func=partial(step_fn, ctx=self._context(batch, temperature)),
                data_iterator=iterators if len(iterators) > 1 else iterators[0],
                model=self.chunks,
                num_microbatches=len(micro_batches),
                seq_length=seq_length,
                micro_batch_size=micro_batch_size,
                forward_only=forward_only,
                pg_collection=g.pg_collection,
                **kwargs,
            )

    def _reduce_metrics(self, outputs: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Sum over micro-batches and DP on the last stage, then broadcast over the pipeline."""
        g = self.groups
        result: list[Any] = [None]
        if g.is_last_stage:
            # With CP each rank's metrics cover the response tokens it predicts: sum over CP too.
            group = g.dp_cp_group if g.cp_size > 1 else g.dp_group
            reduced = all_reduce_metrics(accumulate_metrics(outputs), group)
            result[0] = finalize_metrics(reduced)
        if g.pp_size > 1:
            dist.broadcast_object_list(result, src=self._last_stage_rank(), group=g.pp_group)
        return result[0]

    def _gather_logprobs(self, outputs: list[dict[str, Any]], batch: RolloutBatch) -> torch.Tensor:
        """[2, N] log-probs and entropies of all N response tokens of the batch, every rank."""
        g = self.groups
        lengths = torch.tensor([s.response_ids.numel() for s in batch.sequences])
        offsets = torch.cumsum(lengths, 0) - lengths
        flat_2N = torch.zeros(2, int(lengths.sum()), dtype=torch.float32)
        if g.is_last_stage and g.cp_size > 1:
            flat_2N = gather_response_values(
                outputs, offsets, int(lengths.sum()), self.groups.cp_group, self.device
            ).cpu()
        elif g.is_last_stage:
            # Each sequence is computed on exactly one DP rank; the others add zeros.
            for out in outputs:
                for local, seq in enumerate(out["seq_indices"]):
                    sel = out["seq_ids_T"] == local
                    start = int(offsets[seq])
                    span = slice(start, start + int(lengths[seq]))
                    flat_2N[0, span] = out["logprobs_T"][sel]
                    flat_2N[1, span] = out["entropy_T"][sel]
        flat_2N = flat_2N.to(self.device)
        if g.is_last_stage and g.dp_size > 1:
            dist.all_reduce(flat_2N, group=g.dp_group)
        if g.pp_size > 1:
            dist.broadcast(flat_2N, src=self._last_stage_rank(), group=g.pp_group)
        return flat_2N.cpu()

    def _last_stage_rank(self) -> int:
        return dist.get_global_rank(self.groups.pp_group, self.groups.pp_size - 1)


def _align_width(mb: MicroBatch, multiple: int) -> MicroBatch:
    """Pad a micro-batch's length to a multiple of ``multiple`` (FP8 GEMMs need the token
    dimension aligned, sequence parallelism splits it over TP). Packed and shared-prefix: one
    extra zero-loss segment; padded: columns of token 0."""
    rows, width = mb.tokens.shape
    return _pad_micro_batch(mb, rows, -(-width // multiple) * multiple)


def _check_model(built: BuiltModel, groups: ParallelGroups, temperature: float) -> None:
    # validate() refuses this config; a PolicyTrainer built without it is refused here too.
    check_interleaved_schedule(groups.pp_size, groups.vpp_size)
    modules = [unwrap_model(chunk) for chunk in built.chunks]
    if not all(isinstance(m, RPTGPTModel) and m.output_hidden_states for m in modules):
        raise ValueError(
            "PolicyTrainer needs RPTGPTModel chunks with hidden-state output: build the model with "
            "build_pretrained(..., output='hidden')"
        )
    if not temperature > 0:
        raise ConfigError(
            f"rollout.temperature={temperature}: training needs the sampling distribution "
            "softmax(logits / T) with T > 0 (greedy rollouts have no log-probs to train on)"
        )


def _check_context_parallel(built: BuiltModel, layout: str, groups: ParallelGroups) -> None:
    """Refuse what context parallelism does not compose with (ConfigError)."""
    cp = built.config.context_parallel_size
    if built.spec != "te":
        raise ConfigError(
            f"parallel.context_parallel_size={cp} needs Transformer Engine attention "
            f"(model.spec=te), not the {built.spec!r} layer spec"
        )
    if capabilities.have_te():
        from megatron.core.utils import get_te_version, is_te_min_version

        if not is_te_min_version("1.10.0"):
            # Older TE (and Megatron with it) drops the padded offsets of packed sequences
            raise ConfigError(
                f"parallel.context_parallel_size={cp} with packed sequences needs Transformer "
                f"Engine >= 1.10, found {get_te_version()}"
            )
    if layout == "shared_prefix":
        raise ConfigError(
            f"parallel.context_parallel_size={cp} cannot split train.micro_batch_layout="
            "shared_prefix: its responses attend to their shared prompt through a custom "
            "per-piece mask, which Transformer Engine's context-parallel (ring) attention cannot "
            "express; use train.micro_batch_layout=packed (docs/SCALING.md)"
        )
    if layout != "packed":
        raise ConfigError(
            f"parallel.context_parallel_size={cp} needs train.micro_batch_layout=packed, not "
            f"{layout!r} (only the packed THD layout is split over context-parallel ranks)"
        )
    if groups.cp_size != cp:
        raise ConfigError(
            f"parallel.context_parallel_size={cp} but the process groups were initialised with "
            f"CP={groups.cp_size}: pass the same value to initialize_model_parallel"
        )


def _check_shared_prefix(built: BuiltModel) -> None:
    """Refuse model settings the shared-prefix layout does not implement (ConfigError)."""
    cfg = built.config
    unsupported = {
        "context_parallel_size > 1": cfg.context_parallel_size > 1,
        "fused_single_qkv_rope": cfg.fused_single_qkv_rope,
        "multi_latent_attention": cfg.multi_latent_attention,
        "window_size (sliding-window attention)": cfg.window_size is not None,
    }
    bad = [name for name, on in unsupported.items() if on]
    if bad:
        raise ConfigError(
            f"train.micro_batch_layout=shared_prefix does not support {', '.join(bad)} "
            "(model.transformer_overrides / parallel); use train.micro_batch_layout=packed"
        )
    if built.spec == "te":
        logger.warning(
            "train.micro_batch_layout=shared_prefix on the Transformer Engine spec uses one "
            "variable-length TE attention call with a bottom-right causal mask; this path has "
            "not been run on a GPU in this repository yet (tests/gpu/test_shared_prefix_gpu.py "
            "checks it). train.micro_batch_layout=packed is the verified fallback."
        )


__all__ = ["PolicyTrainer"]
