"""The run's rollout engines, driven collectively: route, generate, push weights, restart.

Every rank holds an ``EngineFleet`` and calls its methods in the same order. The fleet has
``world_size / rollout.gpus_per_engine`` engines (rollout/placement.py); each engine's lead
rank holds it in an ``EngineGuard`` and drives it, the other ranks join the collectives.

* ``start(version)``: build every engine and push the trainer's weights (a resumed run's
  engines then serve the checkpoint's weights, not the initial model's).
* ``generate(requests, params)``: a round's requests are cut into document-affinity blocks and
  balanced over the engines by expected tokens (rollout/routing.py); each lead generates its
  blocks, one engine call per block with the block's own seed; the completions are gathered to
  every rank (``all_gather_object``) and put back in request order. The result does not depend
  on the number of engines.
* ``push_weights(version)``: the weight sync after an optimizer step, to every engine.
* ``after_rollout()``: colocated SGLang gives its GPU memory back to the trainer.
* ``pop_metrics()``: per-engine requests, generated tokens, time and prefix-cache hit rate of
  the step, the load imbalance and the slowest engine's time.

**Failures.** An ``EngineFailure`` (exception, missed deadline, unhealthy engine, aborted
request; trainer/engine_guard.py) is a failure of *that* engine. Every rank learns it from the
gather; only that engine is rebuilt and receives the trainer's current weights, then its
unfinished blocks are generated again with the same seeds, while the other engines' blocks are
kept. The round's result therefore equals the uninterrupted one. A failed weight sync counts as
a failure of every engine it fed, which are all rebuilt. After ``rollout.max_restarts``
consecutive failures of one engine the next one stops the run with ``RolloutEngineError``
naming the engine: a step never trains on a partial batch. A success resets the count.

Errors outside the engines (a bad request) are not retried: every rank raises.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist

from megatron_rpt.rollout.placement import EnginePlacement
from megatron_rpt.rollout.routing import Route, block_seed, route
from megatron_rpt.rollout.scheduling import RolloutRequest
from megatron_rpt.rollout.types import Completion, SamplingParams
from megatron_rpt.trainer.engine_guard import EngineFailure, EngineGuard, RolloutEngineError
from megatron_rpt.weight_sync import WeightSyncError

logger = logging.getLogger(__name__)

PushFn = Callable[[int, "frozenset[int] | None"], Any]
"""``push(version, engines)``: the collective weight sync from the trainer to ``engines``
(engine indices; None: all of them). Returns this rank's sync metrics."""

Blocks = dict[int, list[list[Completion]]]


class EngineFleet:
    """The engines of a run (see the module docstring); collective on every rank."""

    def __init__(
        self,
        placement: EnginePlacement,
        guard: EngineGuard | None,
        push: PushFn,
        *,
        rank: int,
        max_restarts: int,
        block_contexts: int,
        release_after_rollout: bool = False,
    ) -> None:
        """``guard``: this rank's engine when it is a lead rank; ``push``: the weight sync.

        ``block_contexts``: most contexts per engine call (whole documents stay together).
        """
        self.placement, self.slot = placement, placement.slot(rank)
        assert (guard is not None) == self.slot.is_lead, "exactly the lead ranks hold engines"
        self.guard, self.push = guard, push
        self.max_restarts, self.block_contexts = int(max_restarts), int(block_contexts)
        self.release_after_rollout = release_after_rollout
        self.version = 0
        """Trainer step of the weights the engines hold (what a rebuilt engine receives)."""
        n = placement.num_engines
        self.failures = [0] * n
        """Consecutive failures of each engine since its last success."""
        self.restarts = [0] * n
        """Restarts of each engine since this process started."""
        self._stats = _Stats(n)
        self._fatal: Exception | None = None

    @property
    def num_engines(self) -> int:
        """Engines in the fleet."""
        return self.placement.num_engines

    # ------------------------------------------------------------------ collective API

    def start(self, version: int) -> Any:
        """Build every engine and push the trainer's weights; returns the sync's metrics."""
        return self._bring_up(set(range(self.num_engines)), version, errors={})

    def generate(
        self, requests: Sequence[RolloutRequest], params: SamplingParams
    ) -> list[list[Completion]]:
        """``params.n`` completions per request, request order, on every rank."""
        plan = route(
            requests, self.num_engines, max_contexts=self.block_contexts, n=params.n,
            max_new_tokens=params.max_new_tokens,
        )  # fmt: skip
        done: Blocks = {}
        todo = {e: list(bs) for e, bs in enumerate(plan.engines) if bs}
        self._fatal = None
        while todo:
            mine = todo.get(self.slot.engine, []) if self.slot.is_lead else []
            report = self._run_blocks(plan, requests, params, mine)
            errors = {}
            for engine, (status, blocks, seconds, message) in self._gather(report).items():
                done.update(blocks)
                self._stats.add(engine, plan, requests, blocks, seconds)
                if status == "fatal":
                    if self._fatal is not None:  # the lead that hit it raises the original
                        raise self._fatal
                    raise RuntimeError(f"rollout engine {engine} failed: {message}")
                if status == "engine":
                    errors[engine] = message
                    todo[engine] = [b for b in todo[engine] if b not in blocks]
                elif engine in todo:
                    self.failures[engine] = 0
                    del todo[engine]
            if errors:
                self._bring_up(set(errors), self.version, errors)
        out: list[Any] = [None] * len(requests)
        for block in plan.blocks:
            for k, i in enumerate(block.requests):
                out[i] = done[block.index][k]
        return out

    def push_weights(self, version: int) -> Any:
        """The weight sync after an optimizer step; rebuilds the engines if it fails."""
        try:
            synced = self.push(version, None)
        except WeightSyncError as exc:
            every = set(range(self.num_engines))
            error = f"weight sync v{version} failed: {exc}"
            return self._bring_up(every, version, {e: error for e in every})
        self.version = version
        return synced

    def after_rollout(self) -> None:
        """Colocated SGLang: give the GPU memory back to the trainer (before training)."""
        if not self.release_after_rollout:
            return
        status = ("ok", None)
        if self.guard is not None:
            try:
                self.guard.release_memory()
            except EngineFailure as exc:
                status = ("engine", str(exc))
        failed = {e: m for e, (s, m) in self._gather(status).items() if s == "engine"}
        if failed:  # a rebuilt engine starts without the rollout's memory
            self._bring_up(set(failed), self.version, failed)

    def pop_metrics(self) -> dict[str, float]:
        """The step's per-engine metrics (``rollout/engines``, ``rollout/engine{i}/...``)."""
        stats, self._stats = self._stats, _Stats(self.num_engines)
        return stats.as_dict()

    def shutdown(self) -> None:
        """Stop this rank's engine (idempotent)."""
        if self.guard is not None:
            self.guard.shutdown()

    # ------------------------------------------------------------------ internals

    def _run_blocks(
        self,
        plan: Route,
        requests: Sequence[RolloutRequest],
        params: SamplingParams,
        blocks: list[int],
    ) -> tuple[str, Blocks, float, str | None]:
        """Generate ``blocks`` on this rank's engine: (status, finished blocks, seconds, error)."""
        finished: Blocks = {}
        t0 = time.perf_counter()
        try:
            for b in blocks:
                prompts = [requests[i].prompt_ids for i in plan.blocks[b].requests]
                seeded = dataclasses.replace(params, seed=block_seed(params.seed, b))
                assert self.guard is not None
                finished[b] = self.guard.generate(prompts, seeded)
        except EngineFailure as exc:
            return "engine", finished, time.perf_counter() - t0, str(exc)
        except Exception as exc:  # noqa: BLE001 - every rank raises after the gather
            self._fatal = exc
            return "fatal", finished, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"
        return "ok", finished, time.perf_counter() - t0, None

    def _gather(self, report: Any) -> dict[int, Any]:
        """Every lead rank's ``report`` on every rank, by engine index."""
        mine = (self.slot.engine, report) if self.slot.is_lead else None
        if dist.is_initialized() and dist.get_world_size() > 1:
            everyone: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        return dict(x for x in everyone if x is not None)

    def _bring_up(self, engines: set[int], version: int, errors: dict[int, str]) -> Any:
        """(Re)build ``engines`` and push them the weights; retry until success or the limit."""
        build = set(errors) or set(engines)
        while True:
            self._count_failures(errors, version)
            mine = self._rebuild() if self.guard is not None and self.slot.engine in build else None
            built = self._gather(mine)
            errors = {e: m for e, m in built.items() if m is not None}
            if errors:
                build = set(errors)
                continue
            targets = None if len(engines) == self.num_engines else frozenset(engines)
            try:
                synced = self.push(version, targets)
            except WeightSyncError as exc:
                errors = {
                    e: f"weight sync v{version} to a new engine failed: {exc}" for e in engines
                }
                build = set(engines)
                continue
            self.version = version
            return synced

    def _rebuild(self) -> str | None:
        assert self.guard is not None
        try:
            self.guard.restart()
        except EngineFailure as exc:
            return str(exc)
        return None

    def _count_failures(self, errors: dict[int, str], version: int) -> None:
        for engine, error in sorted(errors.items()):
            self.failures[engine] += 1
            lead = self.placement.ranks(engine).start
            if self.failures[engine] > self.max_restarts:
                raise RolloutEngineError(
                    f"rollout engine {engine} (lead rank {lead}) failed {self.failures[engine]} "
                    f"times in a row (rollout.max_restarts={self.max_restarts}); stopping instead "
                    f"of training on partial data. Last error: {error}"
                )
            self.restarts[engine] += 1
            if self.slot.engine == engine and self.slot.is_lead:
                logger.warning(
                    "rollout engine %d failure %d/%d: %s -- restarting it, pushing the weights "
                    "of step %d and retrying its requests",
                    engine, self.failures[engine], self.max_restarts, error, version,
                )  # fmt: skip


class _Stats:
    """Per-engine work of one step (identical on every rank: built from gathered reports)."""

    def __init__(self, num_engines: int) -> None:
        self.n = num_engines
        self.requests = [0] * num_engines
        self.tokens = [0] * num_engines
        self.seconds = [0.0] * num_engines
        self.prompt_tokens = [0] * num_engines
        self.cached_tokens: list[int | None] = [None] * num_engines

    def add(
        self, engine: int, plan: Route, requests: Sequence[RolloutRequest], blocks: Blocks,
        seconds: float,
    ) -> None:  # fmt: skip
        """Count ``blocks`` (finished by ``engine`` in ``seconds``)."""
        self.seconds[engine] += seconds
        for b, groups in blocks.items():
            for i, group in zip(plan.blocks[b].requests, groups, strict=True):
                self.requests[engine] += 1
                for c in group:
                    self.tokens[engine] += len(c.token_ids)
                    if c.cached_tokens is not None:
                        self.prompt_tokens[engine] += len(requests[i].prompt_ids)
                        self.cached_tokens[engine] = (self.cached_tokens[engine] or 0) + int(
                            c.cached_tokens
                        )

    def as_dict(self) -> dict[str, float]:
        """Flat metrics for the logger."""
        out: dict[str, float] = {"rollout/engines": float(self.n)}
        for e in range(self.n):
            out[f"rollout/engine{e}/requests"] = float(self.requests[e])
            out[f"rollout/engine{e}/generated_tokens"] = float(self.tokens[e])
            out[f"rollout/engine{e}/time_s"] = self.seconds[e]
            cached = self.cached_tokens[e]
            if cached is not None and self.prompt_tokens[e]:
                out[f"rollout/engine{e}/prefix_cache_hit_rate"] = cached / self.prompt_tokens[e]
        mean = sum(self.tokens) / self.n
        out["rollout/load_imbalance"] = max(self.tokens) / mean if mean else 1.0
        out["rollout/slowest_engine_s"] = max(self.seconds)
        return out


__all__ = ["EngineFleet", "PushFn"]
