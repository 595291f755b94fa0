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

Deviations from the paper (docs/METHOD.md), one per line:

* Megatron-Core trainer with an HF or SGLang engine instead of verl with vLLM.
* The reward reads the assistant turn: the prompt's reasoning opener followed by the response.
* Context order: epoch-wise keyed permutations of the kept positions (the paper does not say).
* Rollout seeds derive from (run.seed, contexts consumed), so a resumed step samples the same.
* Before dynamic sampling starts, all-equal groups stay in the batch (advantage 0, as verl).
* Dynamic sampling trains on a partial batch after its last round and skips an empty one.
* The global gradient norm is clipped at 1.0; the paper's "clip 0.2" is the PPO ratio clip
  (loss.clip_low 0.2 / clip_high 0.28, DAPO; no effect while training is exactly on-policy).
* A failed or hung engine is restarted alone and its unfinished requests retried with the same
  seeds (the paper reports nothing).
* rollout.stop_at_final_box (on in the 14B recipe) ends a response at the first closed box after
  </think>: the reward then reads that box, where the paper reads the last box of a full
  response, and EOS is never sampled, so never trained (eval.stop_at_final_box matches it).
* The 14B recipe trains in FP8 (bf16 SGLang rollouts), so token-level TIS corrects the
  precision mismatch (loss.tis resolves to on); the paper has neither.
* prompt.mode=completion (the CPU default, examples/smollm2_cpu) is RPT with an empty chain of
  thought: the prompt is the raw context, the response the next token, the reward its bytes;
  it shows the loop learning, not next-token reasoning.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from megatron_rpt.config_utils import to_dict
from megatron_rpt.model.flops import FlopsCounter
from megatron_rpt.trainer.builders import build_policy_trainer, build_source
from megatron_rpt.trainer.engine_guard import EngineFactory
from megatron_rpt.trainer.fleet import EngineFleet
from megatron_rpt.trainer.metrics import StepMetrics
from megatron_rpt.trainer.ntp import ntp_metrics
from megatron_rpt.trainer.offload import TrainerOffload
from megatron_rpt.trainer.run_logger import RunLogger
from megatron_rpt.trainer.run_state import RunState
from megatron_rpt.trainer.step_batch import BatchSource, StepBatch

if TYPE_CHECKING:
    from megatron_rpt.config import RPTConfig
    from megatron_rpt.distributed import ParallelGroups

logger = logging.getLogger(__name__)

_MAX_SKIPPED_STEPS = 5

PhaseHook = Callable[[str, int], None]
"""``hook(phase, step)`` before "rollout", "train" and (when one is written) "checkpoint"."""


@dataclass
class TrainResult:
    """Where a finished run left things."""

    step: int
    checkpoint: Path | None
    record: dict[str, Any] | None
    """The last step's metrics."""


def run_training(
    cfg: RPTConfig,
    groups: ParallelGroups,
    *,
    resume: str | Path | None = None,
    engine_factory: EngineFactory | None = None,
    on_phase: PhaseHook | None = None,
) -> TrainResult:
    """Train ``cfg`` (resolved: ``config.resolve``) to ``train.steps``; collective over all ranks.

    ``resume``: a training checkpoint to continue from (weights, optimizer, data order).
    ``engine_factory`` replaces the engine ``rollout.engine`` describes. ``on_phase`` is
    called at fixed points of every step (tests stop a run there).
    """
    state, source, fleet = _build(cfg, groups, resume, engine_factory)
    policy, flops = state.policy, state.flops
    away = fleet is not None and cfg.rollout.offload_trainer != "none"
    offload = TrainerOffload.for_step(policy, cfg.rollout.offload_trainer) if away else None
    log = RunLogger(
        cfg.log, Path(cfg.run.run_dir), run_name=cfg.run.name, objective=cfg.train.objective,
        start_step=policy.step, total_steps=cfg.train.steps, config=to_dict(cfg),
        enabled=dist.get_rank() == 0, log_interval=cfg.train.log_interval,
        restored_record=state.extra.get("metrics_record"),
    )  # fmt: skip
    hook = on_phase or (lambda phase, step: None)
    checkpoint, record, skipped = None, None, 0
    try:
        if fleet is not None:
            fleet.start(version=policy.step)  # a resumed engine gets the checkpoint's weights
        with _console(log):
            while policy.step < cfg.train.steps:
                step, times = policy.step, StepTimes()
                with times("step"):
                    hook("rollout", step)
                    with times("rollout"):  # contexts -> G responses -> rewards -> advantages
                        with _trainer_away(offload) as moved:  # colocated memory hand-off
                            rollouts = source.next_batch(step)
                            _after_rollout(fleet, rollouts)
                        rollouts.record.update(moved)
                    flops.add_rollout(*rollouts.rollout_flops)
                    flops.add_scoring(getattr(rollouts, "scoring_lengths", ()))  # RLP's reward passes
                    if rollouts.batch is None:  # dynamic sampling kept no group
                        skipped = _skip(skipped, step)
                        continue
                    skipped = 0
                    hook("train", step)
                    metrics = policy.train_step(rollouts.batch)  # one exactly on-policy step
                    source.after_step()  # RLP: the EMA teacher follows theta
                    with times("weight_sync"):  # the engines sample the next step from theta
                        synced = fleet.push_weights(policy.step) if fleet is not None else None
                    record = _record(metrics, rollouts, flops, synced, times)  # counts FLOPs
                    with times("checkpoint"):  # weights, optimizer, RNG, data order, FLOPs
                        saved = state.save_due()
                        if saved:
                            hook("checkpoint", step)
                            checkpoint = state.save(record)
                record = _with_times(record, metrics, times, cfg.train.objective)
                log.log(record)
                if saved:
                    log.plot()
    finally:
        if fleet is not None:
            fleet.shutdown()
        log.close()
    return TrainResult(policy.step, checkpoint, record)


def _build(
    cfg: RPTConfig,
    groups: ParallelGroups,
    resume: str | Path | None,
    engine_factory: EngineFactory | None,
) -> tuple[RunState, BatchSource, EngineFleet | None]:
    """The policy and the stateful parts (resumed), the batch source and its engines."""
    policy = build_policy_trainer(cfg, groups, resume)
    source, fleet = build_source(cfg, policy, engine_factory)
    flops = FlopsCounter.for_arch(
        policy.built.arch, recompute=cfg.model.recompute_granularity == "full"
    )
    state = RunState(
        policy, source.sampler, flops, objective=cfg.train.objective, checkpoint=cfg.checkpoint,
        total_steps=cfg.train.steps, checkpoints_dir=Path(cfg.run.run_dir) / "checkpoints",
        extras=[source] if hasattr(source, "save_state") else [],
    )  # fmt: skip
    if resume:
        state.resume(resume)
    return state, source, fleet


class StepTimes:
    """Wall times of a step's phases: ``with times("rollout"): ...`` (seconds by name)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Time the block (accumulates when a name repeats)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


@contextlib.contextmanager
def _trainer_away(offload: TrainerOffload | None) -> Iterator[dict[str, float]]:
    """The trainer's optimizer state, gradients (and parameters) out of memory during the
    block (``rollout.offload_trainer``), back bit-identical after it, also on failure; the
    yielded dict receives the hand-off's metrics."""
    moved: dict[str, float] = {}
    if offload is None:
        yield moved
        return
    moved.update(offload.offload().as_dict())
    try:
        yield moved
    finally:
        moved["offload/reload_s"] = offload.reload()


def _after_rollout(fleet: EngineFleet | None, rollouts: StepBatch) -> None:
    """Hand the memory back to the trainer (colocated engines release theirs; seam for the
    trainer's reload); the engines' per-step metrics join the step's record."""
    if fleet is not None:
        fleet.after_rollout()
        rollouts.record.update(fleet.pop_metrics())


def _record(
    metrics: StepMetrics, rollouts: StepBatch, flops: FlopsCounter, synced: Any, times: StepTimes
) -> dict[str, Any]:
    """The step's flat metrics; closes the step's FLOP count (before a checkpoint saves it)."""
    seqs = rollouts.batch.sequences if rollouts.batch is not None else []
    flops.add_training([s.prompt_ids.numel() for s in seqs], [s.response_ids.numel() for s in seqs])
    metrics.time_s.update(
        rollout=times.seconds["rollout"], weight_sync=times.seconds["weight_sync"]
    )
    record = {**metrics.as_dict(), **rollouts.record, **flops.end_step()}
    if synced is not None:
        record.update(synced.as_dict())
    return record


def _with_times(
    record: dict[str, Any], metrics: StepMetrics, times: StepTimes, objective: str
) -> dict[str, Any]:
    """The checkpoint and whole-step times added; the NTP control's metric names."""
    step_s = times.seconds["step"]
    record = {**record, "time/checkpoint_s": times.seconds["checkpoint"], "time/step_s": step_s,
              "time/step_tokens_per_s": metrics.batch["tokens"] / step_s}  # fmt: skip
    return ntp_metrics(record) if objective == "ntp" else record


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
