"""The rollout engine of a training run: timeouts, failure detection, restart and retry.

Single controller: the engine (the in-process HF engine, or the SGLang client) lives on global
rank 0, the *driver*. Every rank holds an ``EngineGuard`` and calls its collective methods in
the same order; only the driver touches the engine, the other ranks follow its decisions
through ``broadcast_object_list`` and join the weight syncs.

* ``start(version)``: build the engine and push the trainer's weights (a resumed run's engine
  then serves the checkpoint's weights, not the initial model's).
* ``run(produce, version=...)``: the driver runs ``produce(guard)`` (a whole rollout phase,
  whose ``guard.generate`` calls go to the engine); its result is broadcast to every rank.
* ``push_weights(version)``: the weight sync after an optimizer step.

**Failures.** Every engine call runs in a daemon worker thread with a deadline
(``rollout.timeout_s``): an exception, a missed deadline (a hung engine), an unhealthy engine
or an aborted request is an engine failure, and so is a failed weight sync. Then, on every rank:
a warning names the failure; the driver drops the engine (``shutdown``, itself under a short
deadline) and builds a new one; the trainer's current weights are pushed to it in full; the
rollout of the step is retried from the same contexts and seeds. After
``rollout.max_restarts`` consecutive failures the next one stops the run with
``RolloutEngineError`` (never training on a partial batch). A success resets the count.

A hung in-process engine cannot be killed from Python: its worker thread is *abandoned* (it
keeps its memory and CPU until it returns, if ever) and a fresh engine is built next to it.
SGLang servers run in their own process group, which ``shutdown`` terminates.

Errors outside the engine (a bug in reward code, bad data) are not retried: the driver
broadcasts them and every rank raises, so no rank waits forever in a collective.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch.distributed as dist

from megatron_rpt.errors import InputError
from megatron_rpt.rollout.types import Completion, RolloutEngine, SamplingParams
from megatron_rpt.weight_sync import WeightSyncError

logger = logging.getLogger(__name__)

T = TypeVar("T")
EngineFactory = Callable[[], RolloutEngine]
SyncFn = Callable[[RolloutEngine | None, int], Any]
"""``sync(engine_or_None, version)``: the collective weight sync (WeightSync on every rank)."""

_SHUTDOWN_TIMEOUT_S = 60.0


class EngineFailure(RuntimeError):
    """A recoverable failure of the rollout engine (restart it and retry)."""


class RolloutEngineError(RuntimeError):
    """The engine kept failing: the run stops instead of training on partial data."""


def call_with_timeout(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """``fn()`` in a daemon thread; EngineFailure on an exception or after ``timeout_s``.

    ``InputError`` (a deterministic problem with what was asked) passes through unchanged.

    >>> call_with_timeout(lambda: 3, 5.0, "add")
    3
    >>> import time
    >>> call_with_timeout(lambda: time.sleep(5), 0.05, "nap")
    Traceback (most recent call last):
    ...
    megatron_rpt.trainer.engine_guard.EngineFailure: nap did not return within 0.05 s (rollout.timeout_s): the engine is considered hung and its thread is abandoned
    """
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            result["error"] = exc

    thread = threading.Thread(target=target, name=f"rpt-engine: {what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise EngineFailure(
            f"{what} did not return within {timeout_s:g} s (rollout.timeout_s): the engine is "
            "considered hung and its thread is abandoned"
        )
    if "error" in result:
        exc = result["error"]
        if isinstance(exc, InputError):
            raise exc
        raise EngineFailure(f"{what} raised {type(exc).__name__}: {exc}") from exc
    return result["value"]


class EngineGuard:
    """The run's rollout engine on the driver rank, behind timeouts and a restart policy."""

    def __init__(
        self,
        factory: EngineFactory | None,
        sync: SyncFn,
        *,
        timeout_s: float,
        max_restarts: int,
        is_driver: bool,
    ) -> None:
        """``factory`` builds an engine (called on the driver only); ``sync`` pushes weights."""
        assert not is_driver or factory is not None, "the driver rank needs an engine factory"
        self.factory, self.sync = factory, sync
        self.timeout_s, self.max_restarts = float(timeout_s), int(max_restarts)
        self.is_driver = is_driver
        self.engine: RolloutEngine | None = None
        self.failures = 0
        """Consecutive failures since the last successful rollout."""
        self.restarts = 0
        """Engine restarts since this process started."""

    # ------------------------------------------------------------------ collective API

    def start(self, version: int) -> Any:
        """Build the engine and push the trainer's weights (collective); returns sync metrics."""
        return self._bring_up(version, error=None)

    def run(self, produce: Callable[[EngineGuard], T], *, version: int) -> T:
        """``produce(self)`` on the driver, retried after engine failures; result on every rank.

        ``version`` is the trainer's step (the weights a restarted engine receives).
        ``produce`` must be safe to repeat (it restores its own inputs, e.g. the sampler).
        """
        while True:
            status, payload = "ok", None
            if self.is_driver:
                try:
                    payload = produce(self)
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
                raise RuntimeError(f"rank 0 failed during the rollout phase: {payload}")
            self._bring_up(version, error=payload)

    def push_weights(self, version: int) -> Any:
        """The weight sync after an optimizer step (collective); restarts the engine if it fails."""
        try:
            return self.sync(self.engine if self.is_driver else None, version)
        except WeightSyncError as exc:
            return self._bring_up(version, error=f"weight sync v{version} failed: {exc}")

    def shutdown(self) -> None:
        """Stop the engine (driver; idempotent)."""
        self._discard()

    # ------------------------------------------------------------------ driver-only calls

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Completion]]:
        """``engine.generate`` under the deadline; raises EngineFailure (driver only)."""
        engine = self.engine
        if engine is None:
            raise EngineFailure("no rollout engine")
        if not call_with_timeout(engine.health, self.timeout_s, "engine.health"):
            raise EngineFailure("the rollout engine reports itself unhealthy")
        groups = call_with_timeout(
            lambda: engine.generate(prompts, params), self.timeout_s, "engine.generate"
        )
        aborted = sum(c.finish_reason == "abort" for g in groups for c in g)
        if aborted:
            raise EngineFailure(f"the engine aborted {aborted} of the step's requests")
        if len(groups) != len(prompts) or any(len(g) != params.n for g in groups):
            raise EngineFailure(
                f"the engine returned {[len(g) for g in groups]} completions for "
                f"{len(prompts)} prompts x {params.n}"
            )
        return groups

    def call(self, fn: Callable[[RolloutEngine], T], what: str) -> T:
        """Any other engine call (e.g. release_memory) under the deadline (driver only)."""
        engine = self.engine
        if engine is None:
            raise EngineFailure("no rollout engine")
        return call_with_timeout(lambda: fn(engine), self.timeout_s, what)

    # ------------------------------------------------------------------ internals

    def _bring_up(self, version: int, error: str | None) -> Any:
        """(Re)build the engine on the driver and push weights; retry until success or limit."""
        while True:
            if error is not None:
                self._count_failure(error, version)
            ok, error = self._rebuild()
            if not ok:
                continue
            try:
                return self.sync(self.engine if self.is_driver else None, version)
            except WeightSyncError as exc:
                error = f"weight sync v{version} to the new engine failed: {exc}"

    def _count_failure(self, error: str, version: int) -> None:
        self.failures += 1
        if self.failures > self.max_restarts:
            raise RolloutEngineError(
                f"the rollout engine failed {self.failures} times in a row "
                f"(rollout.max_restarts={self.max_restarts}); stopping instead of training on "
                f"partial data. Last error: {error}"
            )
        self.restarts += 1
        if self.is_driver:
            logger.warning(
                "rollout engine failure %d/%d: %s -- restarting the engine, pushing the weights "
                "of step %d and retrying",
                self.failures, self.max_restarts, error, version,
            )  # fmt: skip

    def _rebuild(self) -> tuple[bool, str | None]:
        status: tuple[bool, str | None] = (True, None)
        if self.is_driver:
            self._discard()
            assert self.factory is not None
            try:
                self.engine = call_with_timeout(self.factory, self.timeout_s, "building the engine")
            except EngineFailure as exc:
                status = (False, str(exc))
        return _broadcast(status)

    def _discard(self) -> None:
        engine, self.engine = self.engine, None
        if engine is None:
            return
        try:
            call_with_timeout(engine.shutdown, _SHUTDOWN_TIMEOUT_S, "engine.shutdown")
        except EngineFailure as exc:
            logger.warning("could not shut the old rollout engine down cleanly: %s", exc)


def _broadcast(obj: T) -> T:
    """``obj`` from global rank 0 to every rank (returns rank 0's value everywhere)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


__all__ = [
    "EngineFailure",
    "EngineGuard",
    "RolloutEngineError",
    "call_with_timeout",
]
