"""Weight sync from the Megatron trainer to the rollout engine: plan once, then execute.

``plan.py`` (pure planning; its docstring draws the whole path and the synchronization
guarantees), ``gather.py`` (PP broadcast, TP all-gather, conversion, buckets), ``push.py``
(feeding the engine, failure handling, metrics), ``engine_plan.py`` / ``per_engine.py`` (one
engine per group of GPUs: each engine rank's payload from the trainer rank on its GPU),
``verify.py`` (fingerprints and the log-prob probe), ``config.py`` (``cfg.weight_sync``).

Usage, on every rank (one engine, held by global rank 0, None elsewhere)::

    sync = WeightSync(built, groups, engine if rank == 0 else None, cfg.weight_sync)
    ...
    metrics = sync(version=step)  # after each optimizer step; raises WeightSyncError

One engine per group of GPUs (every rank; the engine object on each engine's lead)::

    sync = WeightSync(built, groups, engine_or_None, cfg.weight_sync,
                      engine_rank=r, engine_tp=e, engine_group=gloo_group, engine_kind="hf")
"""

from megatron_rpt.weight_sync.config import WeightSyncConfig
from megatron_rpt.weight_sync.per_engine import EngineRanks
from megatron_rpt.weight_sync.plan import SyncPlan, make_plan
from megatron_rpt.weight_sync.push import (
    SyncMetrics,
    WeightSync,
    build_plan,
    sync_engine_weights,
    sync_weights,
)
from megatron_rpt.weight_sync.verify import WeightSyncError

__all__ = [
    "EngineRanks",
    "SyncMetrics",
    "SyncPlan",
    "WeightSync",
    "WeightSyncConfig",
    "WeightSyncError",
    "build_plan",
    "make_plan",
    "sync_engine_weights",
    "sync_weights",
]
