"""Everything a training checkpoint holds, in one place: the policy, the data order, FLOPs.

The policy (weights, optimizer, scheduler, RNG, step) is written by
``trainer.checkpoint.save_training_checkpoint``; the loop's own state (the sampler's position,
the FLOP counters, the objective) travels in its ``extra`` entry. ``RunState`` registers those
parts once, so the loop only asks it to resume or to save when a save is due.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_rpt.errors import CheckpointError
from megatron_rpt.model.flops import FlopsCounter
from megatron_rpt.trainer.checkpoint import (
    is_save_step,
    load_training_checkpoint,
    save_training_checkpoint,
)
from megatron_rpt.trainer.config import CheckpointConfig
from megatron_rpt.trainer.run_logger import jsonable
from megatron_rpt.trainer.sampler import ContextSampler
from megatron_rpt.trainer.step import PolicyTrainer


class RunState:
    """The stateful parts of a run, saved and restored together (collective)."""

    def __init__(
        self,
        policy: PolicyTrainer,
        sampler: ContextSampler,
        flops: FlopsCounter,
        *,
        objective: str,
        checkpoint: CheckpointConfig,
        total_steps: int,
        checkpoints_dir: Path,
        extras: Sequence[Any] = (),
    ) -> None:
        """``objective`` is ``train.objective`` (a checkpoint refuses to continue another);
        ``extras``: more stateful parts, each with ``save_state(checkpoint_dir)`` (called on
        every rank while the checkpoint is written) and ``load_state(trainer_state)`` (RLP's
        EMA teacher)."""
        self.policy, self.sampler, self.flops = policy, sampler, flops
        self.extras = list(extras)
        self.objective, self.cfg = objective, checkpoint
        self.total_steps, self.dir = total_steps, Path(checkpoints_dir)
        self.extra: dict[str, Any] = {}
        """The resumed checkpoint's ``extra`` entry (empty for a fresh run)."""

    def resume(self, path: str | Path) -> None:
        """Weights, optimizer, RNG and step, then the data order and FLOP counts."""
        loaded = load_training_checkpoint(self.policy, path)
        extra = self.extra = loaded.extra
        if self.policy.step == 0 and not extra:
            return
        saved = extra.get("objective", "rpt")
        if saved != self.objective:
            raise CheckpointError(
                f"the checkpoint was trained with train.objective={saved}, this run sets "
                f"{self.objective}; use another run.run_dir"
            )
        self.sampler.load_state_dict(extra["sampler"])
        self.flops.load_state_dict(extra["flops"])
        for part in self.extras:
            part.load_state(loaded)

    def save_due(self) -> bool:
        """A checkpoint is due after the current step (``checkpoint.interval``, the last step)."""
        return is_save_step(self.policy.step, self.cfg, self.total_steps)

    def save(self, record: dict[str, Any] | None = None) -> Path:
        """Write ``<checkpoints_dir>/step_NNNNNNN`` (collective). ``record``, the step's
        metrics line, is kept in the checkpoint so a resume can restore a line a crash lost."""
        extra = {"sampler": self.sampler.state_dict(), "flops": self.flops.state_dict(),
                 "objective": self.objective}  # fmt: skip
        if record is not None:
            extra["metrics_record"] = jsonable(record)
        writers = [part.save_state for part in self.extras]
        return save_training_checkpoint(self.policy, self.dir, self.cfg, extra=extra, writers=writers)


__all__ = ["RunState"]
