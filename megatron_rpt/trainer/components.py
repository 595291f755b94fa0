"""Building the pieces the training loop drives: training step, data phase, engine, sync.

* ``build_train_step``: the Megatron model (from the initial weights, or straight from the
  checkpoint being resumed) wrapped in a ``TrainStep``; the NTP objective trains at
  temperature 1 (plain cross-entropy), RPT at the sampling temperature.
* ``build_phase``: for RPT a ``RolloutPhase`` (train ``SampleStore``, tokenizer,
  ``ContextSampler``, ``EngineGuard`` around the rollout engine on rank 0, ``WeightSync``);
  for NTP an ``NTPPhase`` over windows of the same prepared data. Both answer the same small
  interface the loop uses: ``sampler``, ``start``, ``next_batch``, ``push_weights``,
  ``shutdown``.
* ``default_engine_factory``: the engine ``rollout.engine`` names, loaded from
  ``rollout.model`` or ``model.hf_path``. A directory without weights (an HF config given for
  a Megatron checkpoint) gives an engine with placeholder weights: the first weight sync
  overwrites every tensor before any rollout.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_rpt.trainer.engine_guard import EngineFactory, EngineGuard
from megatron_rpt.trainer.ntp import NTPPhase, NTPWindows
from megatron_rpt.trainer.rollout_phase import RolloutPhase, StepRollouts
from megatron_rpt.trainer.sampler import ContextSampler
from megatron_rpt.trainer.step import TrainStep
from megatron_rpt.weight_sync.fp8 import DequantizingEngine, rollout_quantization

logger = logging.getLogger(__name__)


def build_train_step(cfg: Any, groups: Any, resume: str | Path | None) -> TrainStep:
    """Model + DDP + optimizer for ``cfg`` (an ``RPTConfig``); weights of ``resume`` if given."""
    model_cfg = cfg.model
    if resume is not None:  # read the checkpoint's weights once instead of the initial ones
        model_cfg = dataclasses.replace(cfg.model, megatron_checkpoint=str(resume))
    ntp = cfg.train.objective == "ntp"
    return TrainStep.from_config(cfg, groups, model=model_cfg, temperature=1.0 if ntp else None)


def default_engine_factory(cfg: Any) -> EngineFactory:
    """Builds the engine ``cfg.rollout`` describes (called on the driver rank only)."""
    from megatron_rpt.assets import resolve_model_path

    path = resolve_model_path(cfg.rollout.model or cfg.model.hf_path)
    has_weights = any(path.glob("*.safetensors"))

    def build() -> Any:
        if cfg.rollout.engine == "hf":
            engine = _hf_engine(path, cfg.rollout, has_weights)
            quantization = rollout_quantization(cfg.precision)
            if quantization is None:
                return engine
            # The HF engine holds no FP8 weights: it serves the FP8-rounded weights dequantized.
            dtype = next(engine.model.parameters()).dtype
            return DequantizingEngine(engine, quantization, dtype)
        from megatron_rpt.rollout.sglang_engine import SGLangEngine

        rollout = cfg.rollout
        if not has_weights:  # SGLang allocates random weights; the first sync fills them
            sglang = dataclasses.replace(
                rollout.sglang, extra_args={**rollout.sglang.extra_args, "load-format": "dummy"}
            )
            rollout = dataclasses.replace(rollout, sglang=sglang)
        return SGLangEngine.launch(rollout, str(path), seed=cfg.run.seed)

    return build


def _hf_engine(path: Path, rollout: Any, has_weights: bool) -> Any:
    from megatron_rpt.rollout.hf_engine import HFEngine

    return HFEngine.from_pretrained(
        path, dtype=rollout.dtype, device=rollout.device,
        max_batch_rows=rollout.max_batch_rows, load_weights=has_weights,
    )  # fmt: skip


class RPTPhase:
    """The RPT side of the loop: rollouts through the guarded engine, weight pushes."""

    def __init__(self, rollouts: RolloutPhase, guard: EngineGuard) -> None:
        self.rollouts, self.guard, self.sampler = rollouts, guard, rollouts.sampler

    def start(self, version: int) -> Any:
        """Engine up, trainer weights pushed (collective)."""
        return self.guard.start(version)

    def next_batch(self, step: int) -> StepRollouts:
        """The step's global batch (collective)."""
        return self.rollouts.next_batch(step)

    def push_weights(self, version: int) -> Any:
        """Weight sync after the optimizer step (collective)."""
        return self.guard.push_weights(version)

    def shutdown(self) -> None:
        """Stop the engine."""
        self.guard.shutdown()


class NTPControlPhase:
    """The NTP side: windows only; nothing to generate or push."""

    def __init__(self, windows: NTPPhase) -> None:
        self.windows, self.sampler = windows, windows.sampler

    def start(self, version: int) -> None:
        """Nothing to start."""

    def next_batch(self, step: int) -> StepRollouts:
        """The step's windows as a batch (identical on every rank, no communication)."""
        batch, record = self.windows.next_batch(step)
        return StepRollouts(batch, record, self.sampler.state_dict(), ([], []))

    def push_weights(self, version: int) -> None:
        """No engine."""

    def shutdown(self) -> None:
        """Nothing to stop."""


def build_phase(
    cfg: Any, train_step: TrainStep, engine_factory: EngineFactory | None = None
) -> RPTPhase | NTPControlPhase:
    """The data side of the loop for ``cfg.train.objective`` (collective for RPT)."""
    prepared = Path(cfg.data.prepared_dir)
    if cfg.train.objective == "ntp":
        windows = NTPWindows(prepared, cfg.data.context_tokens)
        sampler = ContextSampler(len(windows), cfg.run.seed)
        return NTPControlPhase(NTPPhase(windows, sampler, cfg.train.contexts_per_step))
    from transformers import AutoTokenizer

    from megatron_rpt.data.store import SampleStore
    from megatron_rpt.weight_sync import WeightSync

    store = SampleStore.open(
        prepared,
        "train",
        context_tokens=cfg.data.context_tokens,
        continuation_tokens=cfg.data.continuation_tokens,
    )
    driver = dist.get_rank() == 0
    tokenizer = AutoTokenizer.from_pretrained(train_step.built.hf_dir) if driver else None
    wsync = WeightSync(
        train_step.built, train_step.groups, None, cfg.weight_sync,
        rollout_quantization(cfg.precision),
    )  # fmt: skip

    def sync(engine: Any, version: int) -> Any:
        train_step.finish_param_sync()
        wsync.engine = engine
        return wsync(version=version)

    guard = EngineGuard(
        (engine_factory or default_engine_factory(cfg)) if driver else None,
        sync,
        timeout_s=cfg.rollout.timeout_s,
        max_restarts=cfg.rollout.max_restarts,
        is_driver=driver,
    )
    sampler = ContextSampler(len(store), cfg.run.seed)
    phase = RPTPhase(RolloutPhase(cfg, store, tokenizer, sampler, guard), guard)
    if cfg.train.objective == "rlp":  # the same data, engine and sync; RLP's reward
        from megatron_rpt.trainer.rlp import RLPPhase

        return RLPPhase.wrap(cfg, phase, train_step)
    return phase


__all__ = [
    "NTPControlPhase",
    "RPTPhase",
    "build_phase",
    "build_train_step",
    "default_engine_factory",
]
