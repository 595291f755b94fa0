"""Building the parts the training loop drives: the policy, the batch source, the engines.

* ``build_policy_trainer``: the Megatron model (from the initial weights, or straight from the
  checkpoint being resumed) wrapped in a ``PolicyTrainer``; the NTP objective trains at
  temperature 1 (plain cross-entropy), RPT at the sampling temperature.
* ``build_source``: for RPT a ``RolloutSource`` (train ``SampleStore``, tokenizer,
  ``ContextSampler``) whose generate function is the ``EngineFleet``: one engine per
  ``rollout.gpus_per_engine`` ranks (``fleet_placement``), each in an ``EngineGuard`` on its
  lead rank and fed by that rank's ``WeightSync``; for NTP an ``NTPSource`` over windows of
  the same prepared data, and no engines.
* ``rollout_engine_factory``: the engine ``rollout.engine`` names, loaded from
  ``rollout.model`` or ``model.hf_path``. A directory without weights (an HF config given for
  a Megatron checkpoint) gives an engine with placeholder weights: the first weight sync
  overwrites every tensor before any rollout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from megatron_rpt.assets import resolve_model_path
from megatron_rpt.data.store import SampleStore
from megatron_rpt.errors import ConfigError
from megatron_rpt.rollout.hf_engine import HFEngine
from megatron_rpt.rollout.placement import EnginePlacement, EngineSlot, default_gpus_per_engine
from megatron_rpt.rollout.sglang_engine import SGLangEngine
from megatron_rpt.trainer.engine_guard import EngineFactory, EngineGuard
from megatron_rpt.trainer.fleet import EngineFleet
from megatron_rpt.trainer.ntp import NTPSource, NTPWindows
from megatron_rpt.trainer.rlp import RLPSource
from megatron_rpt.trainer.rollout_source import RolloutSource
from megatron_rpt.trainer.sampler import ContextSampler
from megatron_rpt.trainer.step import PolicyTrainer
from megatron_rpt.weight_sync import WeightSync, sync_weights
from megatron_rpt.weight_sync.fp8 import DequantizingEngine, rollout_quantization

if TYPE_CHECKING:
    from megatron_rpt.config import RPTConfig
    from megatron_rpt.distributed import ParallelGroups
    from megatron_rpt.rollout.config import RolloutConfig
    from megatron_rpt.rollout.hf_engine import HFEngine
    from megatron_rpt.rollout.types import RolloutEngine

logger = logging.getLogger(__name__)


def build_policy_trainer(
    cfg: RPTConfig, groups: ParallelGroups, resume: str | Path | None
) -> PolicyTrainer:
    """Model + DDP + optimizer for a resolved ``cfg``; weights of ``resume`` if given."""
    model_cfg = cfg.model
    if resume is not None:  # read the checkpoint's weights once instead of the initial ones
        model_cfg = dataclasses.replace(cfg.model, megatron_checkpoint=str(resume))
    ntp = cfg.train.objective == "ntp"
    return PolicyTrainer.from_config(
        groups, model=model_cfg, parallel=cfg.parallel, precision=cfg.precision,
        optimizer=cfg.optimizer, train=cfg.train, loss=cfg.loss,
        temperature=1.0 if ntp else cfg.rollout.temperature,
    )  # fmt: skip


def rollout_engine_factory(
    cfg: RPTConfig, placement: EnginePlacement | None = None, engine: int = 0
) -> EngineFactory:
    """Builds engine ``engine`` of ``placement`` as ``cfg.rollout`` describes (on its lead rank)."""
    path = resolve_model_path(cfg.rollout.model or cfg.model.hf_path)
    has_weights = any(path.glob("*.safetensors"))

    def build() -> RolloutEngine:
        if cfg.rollout.engine == "hf":
            engine = _hf_engine(path, cfg.rollout, has_weights)
            quantization = rollout_quantization(cfg.precision)
            if quantization is None:
                return engine
            # The HF engine holds no FP8 weights: it serves the FP8-rounded weights dequantized.
            dtype = next(engine.model.parameters()).dtype
            return DequantizingEngine(engine, quantization, dtype)

        rollout = _sglang_server_of(cfg.rollout, placement, engine)
        if not has_weights:  # SGLang allocates random weights; the first sync fills them
            sglang = dataclasses.replace(
                rollout.sglang, extra_args={**rollout.sglang.extra_args, "load-format": "dummy"}
            )
            rollout = dataclasses.replace(rollout, sglang=sglang)
        return SGLangEngine.launch(rollout, str(path), seed=cfg.run.seed)

    return build


def _sglang_server_of(
    rollout: RolloutConfig, placement: EnginePlacement | None, engine: int
) -> RolloutConfig:
    """``rollout`` with engine ``engine``'s GPUs (--tp-size, --base-gpu-id) and its own port.

    An engine wider than a node (the one-engine fallback) keeps ``rollout.sglang.tp_size``
    GPUs of its lead's node, as a single engine always did.
    """
    s = rollout.sglang
    if placement is None or placement.gpus_per_engine > placement.node_size:
        return rollout
    if s.tp_size != placement.gpus_per_engine:
        logger.warning(
            "rollout.sglang.tp_size=%d: engines run with --tp-size rollout.gpus_per_engine=%d",
            s.tp_size, placement.gpus_per_engine,
        )  # fmt: skip
    per_node = placement.node_size // placement.gpus_per_engine
    sglang = dataclasses.replace(
        s, tp_size=placement.gpus_per_engine, port=s.port + engine % per_node if s.port else 0,
        extra_args={**s.extra_args, "base-gpu-id": placement.base_gpu_id(engine)},
        # disaggregated: each engine's own NCCL weight group with its lead rank
        nccl_master_port=s.nccl_master_port + engine % per_node,
        weight_group_name=f"{s.weight_group_name}_{engine}",
    )  # fmt: skip
    return dataclasses.replace(rollout, sglang=sglang)


def _hf_engine(path: Path, rollout: RolloutConfig, has_weights: bool) -> HFEngine:
    return HFEngine.from_pretrained(
        path, dtype=rollout.dtype, device=rollout.device,
        max_batch_rows=rollout.max_batch_rows, load_weights=has_weights,
    )  # fmt: skip


def build_source(
    cfg: RPTConfig, trainer: PolicyTrainer, engine_factory: EngineFactory | None = None
) -> tuple[RolloutSource | NTPSource, EngineFleet | None]:
    """The batch source for ``cfg.train.objective`` and the engines it samples from (RPT)."""
    prepared = Path(cfg.data.prepared_dir)
    if cfg.train.objective == "ntp":
        windows = NTPWindows(prepared, cfg.data.context_tokens)
        sampler = ContextSampler(len(windows), cfg.run.seed)
        return NTPSource(windows, sampler, cfg.train.contexts_per_step), None
    from transformers import AutoTokenizer

    store = SampleStore.open(
        prepared,
        "train",
        context_tokens=cfg.data.context_tokens,
        continuation_tokens=cfg.data.continuation_tokens,
    )
    tokenizer = AutoTokenizer.from_pretrained(trainer.built.hf_dir)
    fleet = build_fleet(cfg, trainer, engine_factory)
    sampler = ContextSampler(len(store), cfg.run.seed)
    source = RolloutSource(
        store, tokenizer, sampler, fleet.generate, rollout=cfg.rollout, prompt=cfg.prompt,
        reward=cfg.reward, loss=cfg.loss, contexts_per_step=cfg.train.contexts_per_step,
        seed=cfg.run.seed,
    )  # fmt: skip
    if cfg.train.objective == "rlp":  # the same data, engines and sync; RLP's reward
        if cfg.rollout.offload_trainer == "all":
            raise ConfigError(
                "rollout.offload_trainer='all' cannot be used with train.objective=rlp: RLP "
                "scores the thoughts with the trainer's model during rollout; use 'optimizer'"
            )
        return RLPSource.wrap(source, trainer, cfg.rlp), fleet
    return source, fleet


def build_fleet(
    cfg: RPTConfig, trainer: PolicyTrainer, engine_factory: EngineFactory | None = None
) -> EngineFleet:
    """The run's engines (one per ``rollout.gpus_per_engine`` ranks) and their weight sync."""
    r, rank = cfg.rollout, dist.get_rank()
    placement = fleet_placement(r, cfg.parallel.tensor_model_parallel_size, dist.get_world_size())
    crowded = _crowded_model_parallel_group(placement, trainer.groups)
    if crowded and r.gpus_per_engine is None:  # the default cannot work here: one engine
        logger.warning(
            "rollout.gpus_per_engine defaults to TP=%d, which puts the lead ranks %s of several "
            "engines in one model-parallel group (pipeline parallel); the weight sync feeds one "
            "engine per group, so this run uses one engine for all %d ranks",
            placement.gpus_per_engine, crowded, placement.world_size,
        )  # fmt: skip
        placement = dataclasses.replace(placement, gpus_per_engine=placement.world_size)
    elif crowded:
        raise ConfigError(
            f"rollout.gpus_per_engine={placement.gpus_per_engine} puts the lead ranks {crowded} "
            "of several engines in one model-parallel group; the weight sync feeds one engine "
            "per model-parallel group: choose rollout.gpus_per_engine so that each group holds "
            "at most one lead (a multiple of the tensor-parallel size at PP = 1)"
        )
    slot = placement.slot(rank)
    guard = None
    if slot.is_lead:
        factory = engine_factory or rollout_engine_factory(cfg, placement, slot.engine)
        guard = EngineGuard(factory, timeout_s=r.timeout_s, name=f"rollout engine {slot.engine}")
    quantization = rollout_quantization(cfg.precision)
    wsync = WeightSync(
        trainer.built, trainer.groups, guard, cfg.weight_sync, quantization,
        **_engine_ranks(placement, slot, r.engine, quantization is not None),
    )  # fmt: skip

    def push(version: int, engines: frozenset[int] | None) -> Any:
        # Every lead rank feeds its own engine from its model-parallel group; a restart feeds
        # only ``engines``. Engines of several GPUs take a payload from every one of their
        # ranks (all engines re-synced: every lead must hold its engine in that collective).
        trainer.finish_param_sync()
        if engines is None or slot.engine in engines or wsync.ranks is not None:
            return wsync(version=version)
        return sync_weights(
            wsync.built, wsync.groups, None, wsync.plan, version=version, cfg=wsync.cfg
        )

    n = r.n_samples
    return EngineFleet(
        placement, guard, push, rank=rank, max_restarts=r.max_restarts,
        block_contexts=r.block_contexts or max(1, r.max_batch_rows // n),
        release_after_rollout=r.engine == "sglang" and r.mode == "colocated",
    )  # fmt: skip


def _engine_ranks(
    placement: EnginePlacement, slot: EngineSlot, engine_kind: str, fp8_rollout: bool
) -> dict[str, Any]:
    """WeightSync's per-engine-rank arguments (collective: every rank creates every engine's
    group), or none for one-GPU engines, where the lead's payload is already its own GPU's.

    Engines of several GPUs get one payload per engine rank, cut by the trainer rank on that
    rank's GPU (weight_sync/per_engine.py). The HF engine's FP8 rollout (dequantizing) has no
    per-rank path, so it keeps the lead's payload.
    """
    if placement.gpus_per_engine == 1 or (engine_kind == "hf" and fp8_rollout):
        return {}
    groups = [
        dist.new_group(ranks=list(placement.ranks(e)), backend="gloo")
        for e in range(placement.num_engines)
    ]
    return dict(
        engine_rank=slot.engine_rank, engine_tp=placement.gpus_per_engine,
        engine_group=groups[slot.engine], engine_kind=engine_kind,
    )  # fmt: skip


def fleet_placement(r: RolloutConfig, tp_size: int, world_size: int) -> EnginePlacement:
    """The engines' placement for ``rollout`` over ``world_size`` ranks at TP ``tp_size``."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    return EnginePlacement(
        world_size,
        default_gpus_per_engine(r.gpus_per_engine, tp_size),
        gpus_per_node=int(local) if local else None, mode=r.mode,
        engine_gpu_offset=r.engine_gpu_offset,
    )  # fmt: skip


def _crowded_model_parallel_group(placement: EnginePlacement, groups: ParallelGroups) -> list[int]:
    """Lead ranks of a model-parallel group holding more than one (collective; [] if none)."""
    leads = set(placement.leads())
    mine = [r for r in dist.get_process_group_ranks(groups.pg_collection.mp) if r in leads]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return next((x for x in everyone if len(x) > 1), [])


__all__ = [
    "build_fleet",
    "fleet_placement",
    "build_source",
    "build_policy_trainer",
    "rollout_engine_factory",
]
