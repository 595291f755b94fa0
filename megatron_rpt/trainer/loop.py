"""The RPT training loop (arXiv 2506.08007, Sec. 3): one optimizer step per rollout batch.

    for step in 1..train.steps:
        contexts  <- the next train.contexts_per_step high-entropy positions of the corpus
        responses <- G = rollout.n_samples samples per context from the engine (pi_theta)
        rewards   <- prefix match of the final \\boxed{} after </think> with the true bytes
        batch     <- GRPO advantages per group (+ dynamic sampling from its start step)
        theta     <- one PPO/GRPO step on the batch (exactly on-policy, no KL)
        engine    <- theta (weight sync, verified)
        log; checkpoint (weights, optimizer, RNG, data order, FLOPs)

``train.objective=ntp`` runs the plain next-token-prediction control through the same loop:
the batch is windows of the same corpus, nothing is generated or synced (trainer/ntp.py).
``train.objective=rlp`` samples thoughts and rewards them by information gain, scored in the
trainer against an EMA teacher that is updated with the weight sync (trainer/rlp.py).

Deviations from the paper (RPT_PAPER.md), one per line:

* Megatron-Core trainer with an HF or SGLang engine instead of verl with vLLM.
* The reward reads the assistant turn: the prompt's reasoning opener followed by the response.
* Context order: epoch-wise keyed permutations of the kept positions (the paper does not say).
* Rollout seeds derive from (run.seed, contexts consumed), so a resumed step samples the same.
* Before dynamic sampling starts, all-equal groups stay in the batch (advantage 0, as verl).
* Dynamic sampling trains on a partial batch after its last round and skips an empty one.
* The global gradient norm is clipped at 1.0; the paper's "clip 0.2" is the PPO ratio clip.
* A failed or hung engine is restarted and the step retried (the paper reports nothing).
* The CPU default (examples/smollm2_cpu) is scaled down and prefills an empty reasoning block.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_rpt.config_utils import to_dict
from megatron_rpt.eval.flops import FlopsCounter
from megatron_rpt.testing.faults import stall_point
from megatron_rpt.trainer.checkpoint import (
    TrainerState,
    is_save_step,
    load_training_checkpoint,
    save_training_checkpoint,
)
from megatron_rpt.trainer.components import build_phase, build_train_step
from megatron_rpt.trainer.engine_guard import EngineFactory
from megatron_rpt.trainer.ntp import ntp_metrics
from megatron_rpt.trainer.run_logger import RunLogger

logger = logging.getLogger(__name__)

_MAX_SKIPPED_STEPS = 5


@dataclass
class TrainResult:
    """Where a finished run left things."""

    step: int
    checkpoint: Path | None
    record: dict[str, Any] | None
    """The last step's metrics."""


def run_training(
    cfg: Any,
    groups: Any,
    *,
    resume: str | Path | None = None,
    engine_factory: EngineFactory | None = None,
) -> TrainResult:
    """Train ``cfg`` (an ``RPTConfig``) to ``train.steps``; collective over all ranks.

    ``resume``: a training checkpoint to continue from (weights, optimizer, data order).
    ``engine_factory`` replaces the engine ``rollout.engine`` describes (driver rank only).
    """
    run_dir, ckpt_dir = Path(cfg.run.run_dir), Path(cfg.run.run_dir) / "checkpoints"
    train_step = build_train_step(cfg, groups, resume)
    state = load_training_checkpoint(train_step, resume) if resume else TrainerState(step=0)
    phase = build_phase(cfg, train_step, engine_factory)
    flops = FlopsCounter.for_arch(
        train_step.built.arch, recompute=cfg.model.recompute_granularity == "full"
    )
    _restore(state, cfg, phase, flops)
    log = RunLogger(
        cfg.log, run_dir, run_name=cfg.run.name, objective=cfg.train.objective,
        start_step=train_step.step, total_steps=cfg.train.steps, config=to_dict(cfg),
        enabled=dist.get_rank() == 0, log_interval=cfg.train.log_interval,
    )  # fmt: skip
    checkpoint, record, skipped = None, None, 0
    try:
        phase.start(version=train_step.step)  # a resumed engine gets the checkpoint's weights
        with _console(log):
            while train_step.step < cfg.train.steps:
                step, t0 = train_step.step, time.perf_counter()
                # Sample contexts, generate G responses each, reward them, GRPO advantages.
                stall_point("rollout", step)
                rollouts = phase.next_batch(step)
                t_rollout = time.perf_counter() - t0
                flops.add_rollout(*rollouts.rollout_flops)
                flops.add_scoring(getattr(rollouts, "scoring_lengths", ()))  # RLP's reward passes
                if rollouts.batch is None:
                    skipped = _skip(skipped, step)
                    continue
                skipped = 0
                # One policy-gradient step on the whole batch (exactly on-policy).
                stall_point("train", step)
                metrics = train_step.train_step(rollouts.batch)
                seqs = rollouts.batch.sequences
                flops.add_training(
                    [s.prompt_ids.numel() for s in seqs], [s.response_ids.numel() for s in seqs]
                )
                # The engine samples the next step from the new weights.
                t1 = time.perf_counter()
                sync = phase.push_weights(version=train_step.step)
                metrics.time_s.update(rollout=t_rollout, weight_sync=time.perf_counter() - t1)
                record = {**metrics.as_dict(), **rollouts.record, **flops.end_step()}
                if sync is not None:
                    record.update(sync.as_dict())
                # Checkpoint: weights, optimizer, RNG, and where the data order stands.
                t2 = time.perf_counter()
                saved = is_save_step(train_step.step, cfg.checkpoint, cfg.train.steps)
                if saved:
                    stall_point("checkpoint", step)
                    extra = {"sampler": phase.sampler.state_dict(), "flops": flops.state_dict(),
                             "objective": cfg.train.objective}  # fmt: skip
                    writers = [phase.save_state] if hasattr(phase, "save_state") else []
                    checkpoint = save_training_checkpoint(
                        train_step, ckpt_dir, cfg.checkpoint, extra=extra, writers=writers
                    )
                record["time/checkpoint_s"] = time.perf_counter() - t2
                record["time/step_s"] = time.perf_counter() - t0
                record["time/step_tokens_per_s"] = metrics.batch["tokens"] / record["time/step_s"]
                if cfg.train.objective == "ntp":
                    record = ntp_metrics(record)
                log.log(record)
                if saved:
                    log.plot()
    finally:
        phase.shutdown()
        log.close()
    return TrainResult(train_step.step, checkpoint, record)


def _restore(state: TrainerState, cfg: Any, phase: Any, flops: FlopsCounter) -> None:
    """Data order and FLOP counts of a resumed run (nothing for a fresh one)."""
    if state.step == 0 and not state.extra:
        return
    saved = state.extra.get("objective", "rpt")
    if saved != cfg.train.objective:
        from megatron_rpt.errors import CheckpointError

        raise CheckpointError(
            f"the checkpoint was trained with train.objective={saved}, this run sets "
            f"{cfg.train.objective}; use another run.run_dir"
        )
    phase.sampler.load_state_dict(state.extra["sampler"])
    flops.load_state_dict(state.extra["flops"])
    if hasattr(phase, "load_state"):  # RLP: the EMA teacher
        phase.load_state(state)


def _skip(skipped: int, step: int) -> int:
    if skipped + 1 >= _MAX_SKIPPED_STEPS:
        raise RuntimeError(
            f"step {step}: dynamic sampling found no group with unequal rewards in "
            f"{_MAX_SKIPPED_STEPS} consecutive attempts; the rewards carry no signal (check the "
            "prompt/reward settings or raise loss.dynamic_sampling_max_rounds)"
        )
    return skipped + 1


def _console(log: RunLogger) -> contextlib.AbstractContextManager:
    """Route log lines around the progress bar (when there is one)."""
    if log.enabled and log.cfg.progress_bar:
        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm()
    return contextlib.nullcontext()


__all__ = ["TrainResult", "run_training"]
