"""The trainer's half of the colocated memory hand-off: get out of the engine's way during
rollout, come back bit-identical for training.

API (two calls around the rollout; the loop makes them)::

    offload = TrainerOffload.for_step(trainer, cfg.rollout.offload_trainer)
    ...  # optimizer step, weight sync (it reads the parameters)
    offload.offload()   # before rollout: optimizer state + gradients (+ parameters for 'all')
    ...  # engine resumes weights, KV cache, CUDA graphs; rollout; engine releases all of it
    offload.reload()    # after rollout, before the next training step

``offload()`` returns an ``OffloadReport`` (bytes moved, seconds) for the metrics; both calls
are no-ops for ``offload_trainer='none'``, and ``reload()`` without a preceding offload does
nothing, so a failed rollout can always call it.

What moves (``rollout.offload_trainer``):

* ``'optimizer'``: the optimizer state (Adam moments and step counters of every inner torch
  optimizer), the fp32 main parameters when they are separate from the model's (bf16
  training), and the gradients (every DDP grad buffer, which also holds the ``main_grad``
  views, plus any ``.grad`` left on a parameter);
* ``'all'``: that, and the model's parameters (the DDP parameter buffers included).

Nothing the engine needs lives in these storages: the weight sync has already copied the
parameters into the engine by the time ``offload()`` runs.

How (megatron_rpt/memory.py): every storage is shrunk in place, so parameters, views and
optimizer-state entries stay the same Python objects. On GPU the bytes go to pinned host
buffers and the CUDA caching allocator is emptied, so the engine's resume finds the memory
free; on CPU they go to a file and the freed pages return to the OS. Reload copies the exact
bytes back: training after a hand-off is bitwise identical to training without one
(tests/unit/test_trainer_offload.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from megatron_rpt.memory import StorageOffload, unique_storages

if TYPE_CHECKING:
    from megatron_rpt.trainer.step import PolicyTrainer

logger = logging.getLogger(__name__)

OffloadMode = Literal["none", "optimizer", "all"]


@dataclass(frozen=True)
class OffloadReport:
    """What one ``offload()`` moved."""

    bytes: int
    """Bytes moved out of device (or host) memory."""
    storages: int
    """Distinct storages moved."""
    seconds: float

    def as_dict(self, prefix: str = "offload/") -> dict[str, float]:
        """Flat metrics for the logger."""
        return {prefix + "bytes": self.bytes, prefix + "storages": self.storages,
                prefix + "seconds": self.seconds}  # fmt: skip


class TrainerOffload:
    """Offload / reload the trainer's optimizer state, gradients and (optionally) parameters."""

    def __init__(
        self,
        chunks: Sequence[torch.nn.Module],
        optimizer: Any,
        mode: OffloadMode = "optimizer",
        *,
        spill_dir: str | Path | None = None,
    ) -> None:
        """``chunks``: the DDP-wrapped model chunks; ``optimizer``: the Megatron optimizer
        (``ChainedOptimizer`` or a single one); ``spill_dir``: where CPU storages are written
        (default: the system temp dir)."""
        if mode not in ("none", "optimizer", "all"):
            raise ValueError(
                f"rollout.offload_trainer must be 'none', 'optimizer' or 'all', got {mode!r}"
            )
        self.chunks, self.optimizer, self.mode = list(chunks), optimizer, mode
        self._store = StorageOffload(spill_dir)

    @classmethod
    def for_step(
        cls, trainer: PolicyTrainer, mode: OffloadMode, *, spill_dir: str | Path | None = None
    ) -> TrainerOffload:
        """For a ``PolicyTrainer`` (its DDP chunks and optimizer)."""
        return cls(trainer.chunks, trainer.optimizer, mode, spill_dir=spill_dir)

    @property
    def offloaded(self) -> bool:
        """Between ``offload()`` and ``reload()``."""
        return self._store.offloaded

    def offload(self) -> OffloadReport:
        """Move the selected storages out (module docstring)."""
        t0 = time.perf_counter()
        if self.mode == "none":
            return OffloadReport(0, 0, 0.0)
        tensors = self.tensors()
        moved = self._store.offload(tensors)
        report = OffloadReport(moved, self._store.count, time.perf_counter() - t0)
        logger.info("trainer offload (%s): %.1f MiB in %d storages, %.2f s",
                    self.mode, moved / 2**20, report.storages, report.seconds)  # fmt: skip
        return report

    def reload(self) -> float:
        """Bring everything back; returns the seconds it took (0 when nothing was out)."""
        t0 = time.perf_counter()
        self._store.reload()
        return time.perf_counter() - t0

    def tensors(self) -> list[torch.Tensor]:
        """The tensors whose storages ``offload()`` moves (model storages are left alone
        unless mode is 'all', even where optimizer tensors are views into them)."""
        params = list(_model_tensors(self.chunks))
        if self.mode == "all":
            return (
                params + list(_grad_tensors(self.chunks)) + list(_optimizer_tensors(self.optimizer))
            )
        keep = {s.data_ptr() for s in unique_storages(params)}
        movable = list(_grad_tensors(self.chunks)) + list(_optimizer_tensors(self.optimizer))
        return [t for t in movable if t.untyped_storage().data_ptr() not in keep]


def _buffers(chunk: torch.nn.Module) -> list[Any]:
    """Megatron DDP's ``_ParamAndGradBuffer`` objects of a chunk (none for a plain module)."""
    return list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", []))


def _model_tensors(chunks: Sequence[torch.nn.Module]) -> Iterator[torch.Tensor]:
    for chunk in chunks:
        yield from (p.data for p in chunk.parameters())
        yield from (
            b.param_data for b in _buffers(chunk) if getattr(b, "param_data", None) is not None
        )


def _grad_tensors(chunks: Sequence[torch.nn.Module]) -> Iterator[torch.Tensor]:
    for chunk in chunks:
        yield from (
            b.grad_data for b in _buffers(chunk) if getattr(b, "grad_data", None) is not None
        )
        for p in chunk.parameters():
            for grad in (p.grad, getattr(p, "main_grad", None)):
                if grad is not None:
                    yield grad


def _optimizer_tensors(optimizer: Any) -> Iterator[torch.Tensor]:
    """State and (main) parameters of every torch optimizer inside a Megatron optimizer."""
    for megatron_opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(megatron_opt, "optimizer", megatron_opt)
        for state in inner.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))
        for group in inner.param_groups:
            for p in group["params"]:
                yield p.data
                if p.grad is not None:
                    yield p.grad


__all__ = ["OffloadMode", "OffloadReport", "TrainerOffload"]
