"""One rollout engine behind deadlines and sanity checks, itself a ``RolloutEngine``.

``EngineGuard`` holds the engine a factory builds and answers the ``RolloutEngine`` protocol
(rollout/types.py) by forwarding to it, so the fleet (trainer/fleet.py) and ``WeightSync`` see
one ordinary engine. What it adds:

* every sampling call runs in a daemon worker thread with a deadline (``rollout.timeout_s``);
  an exception, a missed deadline (a hung engine), an unhealthy engine, an aborted request, a
  wrong number of completions or missing log-probs raise ``EngineFailure``;
* ``restart()`` drops the engine (``shutdown`` under a short deadline) and builds a new one.

It is local to the rank that holds it: deciding *when* to restart, pushing weights to the new
engine and retrying the work are the fleet's job, which every rank follows collectively.

A hung in-process engine cannot be killed from Python: its worker thread is *abandoned* (it
keeps its memory and CPU until it returns, if ever) and a fresh engine is built next to it.
SGLang servers run in their own process group, which ``shutdown`` terminates.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from megatron_rpt.errors import InputError
from megatron_rpt.rollout.types import Completion, PrefixCacheStats, RolloutEngine, SamplingParams

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")
EngineFactory = Callable[[], RolloutEngine]

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
    """A ``RolloutEngine`` that forwards to the engine ``factory`` builds, under deadlines."""

    def __init__(self, factory: EngineFactory, *, timeout_s: float, name: str = "engine 0") -> None:
        """``factory`` builds an engine (on ``start`` and ``restart``); ``name`` is for errors."""
        self.factory, self.timeout_s, self.name = factory, float(timeout_s), name
        self.engine: RolloutEngine | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Build the engine (EngineFailure if the factory raises or hangs)."""
        self.engine = call_with_timeout(self.factory, self.timeout_s, f"building {self.name}")

    def restart(self) -> None:
        """Drop the current engine and build a new one (EngineFailure if that fails)."""
        self.shutdown()
        self.start()

    def shutdown(self) -> None:
        """Stop the engine (idempotent; a shutdown that hangs is logged and abandoned)."""
        engine, self.engine = self.engine, None
        if engine is None:
            return
        try:
            call_with_timeout(engine.shutdown, _SHUTDOWN_TIMEOUT_S, f"{self.name}.shutdown")
        except EngineFailure as exc:
            logger.warning("could not shut %s down cleanly: %s", self.name, exc)

    # ------------------------------------------------------------------ RolloutEngine

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Completion]]:
        """``engine.generate`` under the deadline, its answer checked; raises EngineFailure."""
        engine = self._live()
        if not call_with_timeout(engine.health, self.timeout_s, f"{self.name}.health"):
            raise EngineFailure(f"{self.name} reports itself unhealthy")
        groups = call_with_timeout(
            lambda: engine.generate(prompts, params), self.timeout_s, f"{self.name}.generate"
        )
        aborted = sum(c.finish_reason == "abort" for g in groups for c in g)
        if aborted:
            raise EngineFailure(f"{self.name} aborted {aborted} of the step's requests")
        if len(groups) != len(prompts) or any(len(g) != params.n for g in groups):
            raise EngineFailure(
                f"{self.name} returned {[len(g) for g in groups]} completions for "
                f"{len(prompts)} prompts x {params.n}"
            )
        if params.return_logprobs and any(
            c.token_ids and c.logprobs is None for g in groups for c in g
        ):
            raise EngineFailure(f"{self.name} returned no log-probs (return_logprobs)")
        return groups

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, version: int,
        flush_cache: bool = True,
    ) -> Any:  # fmt: skip
        """Forwarded as is: the stream runs the trainer's collectives on this thread."""
        return self._live().update_weights(named_tensors, version=version, flush_cache=flush_cache)

    def release_memory(self) -> None:
        """Forwarded under the deadline."""
        self._call(lambda e: e.release_memory(), "release_memory")

    def resume_memory(self) -> None:
        """Forwarded under the deadline."""
        self._call(lambda e: e.resume_memory(), "resume_memory")

    def flush_cache(self) -> None:
        """Forwarded under the deadline."""
        self._call(lambda e: e.flush_cache(), "flush_cache")

    def health(self) -> bool:
        """False when there is no engine or it does not answer in time."""
        try:
            return self.engine is not None and bool(self._call(lambda e: e.health(), "health"))
        except EngineFailure:
            return False

    def weight_checksums(
        self, names: Sequence[str] | None = None, *, max_rows: int | None = 64
    ) -> dict[str, str]:
        """Forwarded (the weight sync's verification)."""
        return self._live().weight_checksums(names, max_rows=max_rows)

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """Forwarded; None when the engine does not report it."""
        stats = getattr(self._live(), "prefix_cache_stats", None)
        return stats() if stats is not None else None

    @property
    def weight_version(self) -> int:
        """The engine's weight version."""
        return self._live().weight_version

    def __getattr__(self, name: str) -> Any:
        """Anything else the engine offers (e.g. ``last_update``, ``model``)."""
        if name == "engine":
            raise AttributeError(name)
        return getattr(self._live(), name)

    # ------------------------------------------------------------------ internals

    def _live(self) -> RolloutEngine:
        if self.engine is None:
            raise EngineFailure(f"{self.name} is not running")
        return self.engine

    def _call(self, fn: Callable[[RolloutEngine], T], what: str) -> T:
        engine = self._live()
        return call_with_timeout(lambda: fn(engine), self.timeout_s, f"{self.name}.{what}")


__all__ = [
    "EngineFactory",
    "EngineFailure",
    "EngineGuard",
    "RolloutEngineError",
    "call_with_timeout",
]
