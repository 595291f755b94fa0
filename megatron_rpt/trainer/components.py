"""Building the parts the training loop drives: the policy, the batch source, the engines.

* ``build_train_step``: the Megatron model (from the initial weights, or straight from the
  checkpoint being resumed) wrapped in a ``TrainStep``; the NTP objective trains at
  temperature 1 (plain cross-entropy), RPT at the sampling temperature.
* ``build_source``: for RPT a ``RolloutSource`` (train ``SampleStore``, tokenizer,
  ``ContextSampler``) whose generate function is the ``EngineFleet`` (the engine in an
  ``EngineGuard`` on rank 0, pushed to by a ``WeightSync``); for NTP an ``NTPSource`` over
  windows of the same prepared data, and no engines.
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
from megatron_rpt.trainer.fleet import EngineFleet
from megatron_rpt.trainer.ntp import NTPSource, NTPWindows
from megatron_rpt.trainer.rollout_source import RolloutSource
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


def build_source(
    cfg: Any, train_step: TrainStep, engine_factory: EngineFactory | None = None
) -> tuple[RolloutSource | NTPSource, EngineFleet | None]:
    """The batch source for ``cfg.train.objective`` and the engines it samples from (RPT)."""
    prepared = Path(cfg.data.prepared_dir)
    if cfg.train.objective == "ntp":
        windows = NTPWindows(prepared, cfg.data.context_tokens)
        sampler = ContextSampler(len(windows), cfg.run.seed)
        return NTPSource(windows, sampler, cfg.train.contexts_per_step), None
    from transformers import AutoTokenizer

    from megatron_rpt.data.store import SampleStore

    store = SampleStore.open(
        prepared,
        "train",
        context_tokens=cfg.data.context_tokens,
        continuation_tokens=cfg.data.continuation_tokens,
    )
    tokenizer = AutoTokenizer.from_pretrained(train_step.built.hf_dir)
    fleet = build_fleet(cfg, train_step, engine_factory)
    sampler = ContextSampler(len(store), cfg.run.seed)
    return RolloutSource(cfg, store, tokenizer, sampler, fleet.generate), fleet


def build_fleet(
    cfg: Any, train_step: TrainStep, engine_factory: EngineFactory | None = None
) -> EngineFleet:
    """The run's engines (one, on rank 0) and the weight sync that feeds them."""
    from megatron_rpt.weight_sync import WeightSync

    r = cfg.rollout
    guard = None
    if dist.get_rank() == 0:
        guard = EngineGuard(engine_factory or default_engine_factory(cfg), timeout_s=r.timeout_s)
    wsync = WeightSync(
        train_step.built, train_step.groups, guard, cfg.weight_sync,
        rollout_quantization(cfg.precision),
    )  # fmt: skip

    def push(version: int) -> Any:
        train_step.finish_param_sync()
        return wsync(version=version)

    return EngineFleet(
        guard, push, max_restarts=r.max_restarts, schedule=r.schedule,
        release_after_rollout=r.engine == "sglang" and r.mode == "colocated",
    )  # fmt: skip


__all__ = [
    "build_fleet",
    "build_source",
    "build_train_step",
    "default_engine_factory",
]
