r"""Weight sync from the Megatron trainer to the rollout engine: plan once, then execute.

::

    every rank (tp t, pp s)                                     rank(s) holding an engine
    ----------------------------------------------------------  ---------------------------
    plan.py    metadata (all_gather_object, once) -> SyncPlan: HF names, shapes, owner stage,
               buckets of <= bucket_bytes (identical on all ranks: digest compared)
    gather.py  per bucket:
                 PP broadcast   shard of the owner stage -> same TP rank of every stage
                 TP all-gather  shards -> full tensor (partition_dim / stride)
                 convert        name table: QKV / gate-up split, vocab padding dropped,
                                tied output layer never emitted; cast to the push dtype
                 bucket         yield HFBucket; nothing of it is kept afterwards
    push.py                                                     engine.update_weights(stream)
    verify.py                                                   fingerprints of the stream
                                                                vs engine.weight_checksums;
               probe: trainer forward log-probs  <---------->   engine greedy log-probs
               all ranks agree on the outcome; any failure -> WeightSyncError everywhere

Synchronization guarantees:

* every rank issues the same collectives in the same order (one plan, compared by digest);
* within a bucket all PP broadcasts complete before the TP all-gathers, which complete before
  conversion; bucket i + 1's collectives start only after the consumer asked for it, so about
  one bucket is in flight (``bucket_bytes``);
* a tensor handed to the engine is never written again by the sync, so engines that keep a
  reference until their own copies finish (SGLang's fence) are safe;
* an engine failure mid-stream never deadlocks the peers (the pushing rank drains the
  stream), and every rank raises ``WeightSyncError`` when any check failed.

Usage (all ranks; the engine object exists on global rank 0 for the HF engine, else None)::

    sync = WeightSync(built, groups, engine if rank == 0 else None, cfg.weight_sync)
    ...
    metrics = sync(version=step)      # after each optimizer step
"""

from megatron_rpt.weight_sync.config import WeightSyncConfig
from megatron_rpt.weight_sync.plan import SyncPlan, make_plan
from megatron_rpt.weight_sync.push import SyncMetrics, WeightSync, build_plan, sync_weights
from megatron_rpt.weight_sync.verify import WeightSyncError

__all__ = [
    "SyncMetrics",
    "SyncPlan",
    "WeightSync",
    "WeightSyncConfig",
    "WeightSyncError",
    "build_plan",
    "make_plan",
    "sync_weights",
]
