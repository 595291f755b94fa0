"""The run's rollout engines, driven collectively: generate, push weights, restart on failure.

Every rank holds an ``EngineFleet`` and calls its methods in the same order; the rank that
holds an engine (an ``EngineGuard``, global rank 0) runs it, the others follow its decisions
through ``broadcast_object_list`` and join the weight syncs.

* ``start(version)``: build the engine and push the trainer's weights (a resumed run's engine
  then serves the checkpoint's weights, not the initial model's).
* ``generate(requests, params)``: the completions of every request, on every rank, in request
  order (sent to the engine grouped by document when ``rollout.schedule = document``).
* ``push_weights(version)``: the weight sync after an optimizer step.
* ``after_rollout()``: colocated SGLang gives its GPU memory back to the trainer.

**Failures.** An ``EngineFailure`` (exception, missed deadline, unhealthy engine, aborted
request; trainer/engine_guard.py) or a failed weight sync is an engine failure. Then, on every
rank: a warning names it; the engine is rebuilt; the trainer's current weights are pushed to it
in full; the failed call is retried with the same requests and seeds, so the result equals the
uninterrupted one. After ``rollout.max_restarts`` consecutive failures the next one stops the
run with ``RolloutEngineError`` (never training on a partial batch). A success resets the count.

Errors outside the engine (a bad request) are not retried: the holder broadcasts them and
every rank raises, so no rank waits forever in a collective.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch.distributed as dist

from megatron_rpt.rollout.scheduling import RolloutRequest, generate_in_document_order
from megatron_rpt.rollout.types import Completion, SamplingParams
from megatron_rpt.trainer.engine_guard import EngineFailure, EngineGuard, RolloutEngineError
from megatron_rpt.weight_sync import WeightSyncError

logger = logging.getLogger(__name__)

T = TypeVar("T")
PushFn = Callable[[int], Any]
"""``push(version)``: the collective weight sync from the trainer to every engine."""


class EngineFleet:
    """The engines of a run (see the module docstring); collective on every rank."""

    def __init__(
        self,
        guard: EngineGuard | None,
        push: PushFn,
        *,
        max_restarts: int,
        schedule: str = "document",
        release_after_rollout: bool = False,
    ) -> None:
        """``guard``: this rank's engine (None on ranks without one); ``push``: the weight sync."""
        self.guard, self.push = guard, push
        self.max_restarts, self.schedule = int(max_restarts), schedule
        self.release_after_rollout = release_after_rollout
        self.version = 0
        """Trainer step of the weights the engines hold (what a rebuilt engine receives)."""
        self.failures = 0
        """Consecutive failures since the last successful engine call."""
        self.restarts = 0
        """Engine restarts since this process started."""

    # ------------------------------------------------------------------ collective API

    def start(self, version: int) -> Any:
        """Build the engine and push the trainer's weights; returns the sync's metrics."""
        return self._bring_up(version, error=None)

    def generate(
        self, requests: Sequence[RolloutRequest], params: SamplingParams
    ) -> list[list[Completion]]:
        """``params.n`` completions per request, request order, on every rank."""
        return self._retrying(lambda guard: self._generate_local(guard, requests, params))

    def push_weights(self, version: int) -> Any:
        """The weight sync after an optimizer step; rebuilds the engine if it fails."""
        try:
            synced = self.push(version)
        except WeightSyncError as exc:
            return self._bring_up(version, error=f"weight sync v{version} failed: {exc}")
        self.version = version
        return synced

    def after_rollout(self) -> None:
        """Colocated SGLang: give the GPU memory back to the trainer (before training)."""
        if self.release_after_rollout:
            self._retrying(lambda guard: guard.release_memory())

    def shutdown(self) -> None:
        """Stop this rank's engine (idempotent)."""
        if self.guard is not None:
            self.guard.shutdown()

    # ------------------------------------------------------------------ internals

    def _generate_local(
        self, guard: EngineGuard, requests: Sequence[RolloutRequest], params: SamplingParams
    ) -> list[list[Completion]]:
        if self.schedule == "document":
            return generate_in_document_order(lambda ps: guard.generate(ps, params), requests)
        return guard.generate([r.prompt_ids for r in requests], params)

    def _retrying(self, call: Callable[[EngineGuard], T]) -> T:
        """``call(guard)`` on the holder, its result on every rank; restart + retry on failure."""
        while True:
            status, payload = "ok", None
            if self.guard is not None:
                try:
                    payload = call(self.guard)
                except EngineFailure as exc:
                    status, payload = "engine", str(exc)
                except BaseException as exc:
                    _broadcast(("fatal", f"{type(exc).__name__}: {exc}"))
                    raise
            status, payload = _broadcast((status, payload))
            if status == "ok":
                self.failures = 0
                return payload
            if status == "fatal":
                raise RuntimeError(f"rank 0 failed during the rollout: {payload}")
            self._bring_up(self.version, error=payload)

    def _bring_up(self, version: int, error: str | None) -> Any:
        """(Re)build the engine and push weights; retry until success or the limit."""
        while True:
            if error is not None:
                self._count_failure(error, version)
            error = self._rebuild()
            if error is not None:
                continue
            try:
                synced = self.push(version)
            except WeightSyncError as exc:
                error = f"weight sync v{version} to the new engine failed: {exc}"
                continue
            self.version = version
            return synced

    def _count_failure(self, error: str, version: int) -> None:
        self.failures += 1
        if self.failures > self.max_restarts:
            raise RolloutEngineError(
                f"the rollout engine failed {self.failures} times in a row "
                f"(rollout.max_restarts={self.max_restarts}); stopping instead of training on "
                f"partial data. Last error: {error}"
            )
        self.restarts += 1
        if self.guard is not None:
            logger.warning(
                "rollout engine failure %d/%d: %s -- restarting the engine, pushing the weights "
                "of step %d and retrying",
                self.failures, self.max_restarts, error, version,
            )  # fmt: skip

    def _rebuild(self) -> str | None:
        error = None
        if self.guard is not None:
            try:
                self.guard.restart()
            except EngineFailure as exc:
                error = str(exc)
        return _broadcast(error)


def _broadcast(obj: T) -> T:
    """``obj`` from global rank 0 to every rank (returns rank 0's value everywhere)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


__all__ = ["EngineFleet", "PushFn"]
