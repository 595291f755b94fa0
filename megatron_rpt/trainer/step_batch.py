"""What a batch source (RPT rollouts, the NTP control) hands the loop for one step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from megatron_rpt.trainer.batch import RolloutBatch
from megatron_rpt.trainer.sampler import ContextSampler


@dataclass
class StepBatch:
    """One step's global batch, identical on every rank."""

    batch: RolloutBatch | None
    """None when dynamic sampling kept no group (the step is skipped)."""
    record: dict[str, Any]
    """Flat per-step metrics (``rollout/*``, ``time/*``, ``data/*``, sample ids)."""
    rollout_flops: tuple[list[int], list[list[int]]]
    """Prompt lengths and response lengths of every generated group (FLOP accounting)."""


class BatchSource(Protocol):
    """Where the loop's batches come from: ``next_batch(step)`` and its data order."""

    sampler: ContextSampler
    """The data order (checkpointed)."""

    def next_batch(self, step: int) -> StepBatch:
        """The global batch of optimizer step ``step`` (0-based)."""
        ...

    def after_step(self) -> None:
        """After each optimizer step, before the weight sync (RLP: the EMA teacher update)."""
        ...


__all__ = ["BatchSource", "StepBatch"]
