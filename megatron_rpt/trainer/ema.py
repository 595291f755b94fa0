"""RLP's "no-think" teacher: an exponential moving average (EMA) of the policy's weights.

``EMATeacher`` keeps phi, one fp32 tensor per parameter of this rank's model chunks, so phi is
sharded exactly like the parameters: each TP rank holds its TP shard, each pipeline stage its
layers, and the DP replicas of a (TP, PP) coordinate hold the same values (as they hold the
same parameters). Its life cycle in an RLP run (trainer/rlp.py):

* ``initialize()`` on the first batch: phi <- theta (a fresh run; a resumed run loads phi);
* ``update()`` after every optimizer step: phi <- tau * phi + (1 - tau) * theta;
* ``swapped_in()``: a context in which the model's parameters *are* phi, so the teacher's
  log-probs come from the same Megatron forward (schedules, TP vocab-parallel log-probs) as the
  policy's; theta is copied aside and restored bit-exactly on exit;
* ``save(dir)`` / ``load(dir)``: part of every training checkpoint, one safetensors file per
  (TP, PP) coordinate written by its DP rank 0, keyed by the canonical (global-layer)
  parameter names. A resume must use the same TP/PP sizes (any DP size).

The memory cost is one fp32 copy of the local parameters for phi plus, while swapped in, one
copy of the parameters in the model dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from megatron_rpt.errors import CheckpointError
from megatron_rpt.loss.rlp import ema_update_
from megatron_rpt.model.parameters import named_global_parameters

EMA_DIR = "ema_teacher"


class EMATeacher:
    """phi for this rank's parameters of ``modules`` (the unwrapped model chunks)."""

    def __init__(self, modules: list[torch.nn.Module], decay: float, *, tp_rank: int,
                 pp_rank: int, dp_rank: int) -> None:  # fmt: skip
        """``decay`` is tau; the ranks name this rank's shard file."""
        self.modules, self.decay = modules, float(decay)
        self.tp_rank, self.pp_rank, self.dp_rank = tp_rank, pp_rank, dp_rank
        self.shadow: list[torch.Tensor] | None = None
        """phi, in ``named_global_parameters`` order; None until initialised or loaded."""

    def _named(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(named_global_parameters(self.modules))

    @property
    def initialized(self) -> bool:
        """Whether phi exists (initialised from theta or loaded from a checkpoint)."""
        return self.shadow is not None

    @torch.no_grad()
    def initialize(self) -> None:
        """phi <- theta (fp32 copies)."""
        self.shadow = [p.detach().float().clone() for _, p in self._named()]

    def update(self) -> None:
        """phi <- tau * phi + (1 - tau) * theta (call after each optimizer step)."""
        if self.shadow is None:
            raise RuntimeError("EMATeacher.update before initialize/load")
        ema_update_(self.shadow, (p for _, p in self._named()), self.decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model's parameters hold phi inside the block; theta is restored exactly."""
        if self.shadow is None:
            raise RuntimeError("EMATeacher.swapped_in before initialize/load")
        params = [p for _, p in self._named()]
        with torch.no_grad():
            theta = [p.detach().clone() for p in params]
            for p, phi in zip(params, self.shadow, strict=True):
                p.copy_(phi)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(params, theta, strict=True):
                    p.copy_(saved)

    def _file(self, root: Path) -> Path:
        return root / EMA_DIR / f"tp{self.tp_rank:03d}_pp{self.pp_rank:03d}.safetensors"

    def save(self, checkpoint_dir: str | Path) -> None:
        """Write this (TP, PP) coordinate's phi (DP rank 0 only) under ``checkpoint_dir``."""
        from safetensors.torch import save_file

        if self.shadow is None:
            raise RuntimeError("EMATeacher.save before initialize/load")
        if self.dp_rank != 0:
            return
        path = self._file(Path(checkpoint_dir))
        path.parent.mkdir(parents=True, exist_ok=True)
        names = [n for n, _ in self._named()]
        save_file({n: t.contiguous() for n, t in zip(names, self.shadow, strict=True)}, path)

    def load(self, checkpoint_dir: str | Path) -> None:
        """Read phi back; CheckpointError when the file is missing or the layout differs."""
        from safetensors.torch import load_file

        path = self._file(Path(checkpoint_dir))
        if not path.is_file():
            raise CheckpointError(
                f"{path}: missing: the checkpoint has no EMA teacher for this rank's TP/PP "
                "coordinate (saved by another objective, or at other TP/PP sizes)"
            )
        saved = load_file(path)
        named = self._named()
        expected = {n: tuple(p.shape) for n, p in named}
        got = {n: tuple(t.shape) for n, t in saved.items()}
        if got != expected:
            raise CheckpointError(
                f"{path}: EMA teacher tensors do not match this rank's parameters (the "
                "checkpoint was saved at other TP/PP sizes); resume at the saved layout"
            )
        self.shadow = [saved[n].float() for n, _ in named]


__all__ = ["EMA_DIR", "EMATeacher"]
