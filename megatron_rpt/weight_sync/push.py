"""Run a sync: feed the executor's stream to the engine, verify, agree on the outcome.

``sync_weights`` is collective over **all** ranks. Ranks holding an engine object (the HF
engine lives on global rank 0; at most one engine per model-parallel group) feed the
executor's stream to ``engine.update_weights``; the other ranks of their model-parallel group
only join the collectives, and data-parallel replicas without an engine skip the gather.

Failure handling (no rank may hang, none may carry on with a half-updated engine):

* if the engine raises or stops reading mid-stream, the pushing rank *drains* the remaining
  buckets so its peers complete their collectives, and records the error;
* an exception inside the executor itself (a broken collective, a changed parameter) is
  re-raised at once: the peers then fail in their own collectives or time out;
* the probe's first collective carries a "skip" marker when the push already failed;
* at the end every rank all-gathers the error messages (``all_gather_object`` over the world)
  and every rank raises ``WeightSyncError`` if any message is set.

SGLang (GPU): the ``SGLangEngine`` adapter re-buckets the stream per dtype, copies each bucket
into a fresh ``FlattenedTensorBucket`` whose memory torch's CUDA-IPC reference counting keeps
until the server's copies finished (rollout/sglang_engine.py, "bucket lifetime"). Nothing here duplicates that.
What this side guarantees is that a tensor it hands out is never written again by the sync (it
is fresh memory, or a read-only view of a parameter at TP = 1), so the adapter may hold on to
it as long as it needs. The adapter holds up to ``rollout.sglang.bucket_bytes`` of our tensors
before flattening, so keep that no larger than ``weight_sync.bucket_bytes``.

Which trainer rank feeds which engine TP rank (colocated). Two paths:

* one engine, its client on one rank (``WeightSync(..., engine)`` without ``engine_group``):
  the client pushes every full tensor; SGLang serialises each flattened bucket once per engine
  TP rank as CUDA-IPC handles of the *client's* GPU, so every engine TP rank copies its shard
  from that one GPU; data-parallel replicas without an engine skip the gather;
* one engine per group of GPUs (``engine_rank`` / ``engine_tp`` / ``engine_group`` given,
  ``sync_engine_weights``): every rank builds the payload of the engine TP rank on its own GPU
  and the engine's lead rank hands the engine one payload per TP rank (per_engine.py). Every
  replica gathers inside itself; nothing crosses between replicas.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_rpt.distributed import ParallelGroups
from megatron_rpt.dtypes import torch_dtype
from megatron_rpt.model.build import BuiltModel
from megatron_rpt.rollout.types import RolloutEngine
from megatron_rpt.weight_sync.config import WeightSyncConfig
from megatron_rpt.weight_sync.fp8 import FP8_DTYPE, BlockFP8
from megatron_rpt.weight_sync.gather import HFBucket, collect_metadata, iter_hf_buckets
from megatron_rpt.weight_sync.per_engine import (
    EngineKind,
    EngineRanks,
    RankEncoder,
    check_engine_placement,
    drain,
    encoder_for,
    rank_payload_stream,
)
from megatron_rpt.weight_sync.plan import SyncPlan, make_plan
from megatron_rpt.weight_sync.verify import (
    ProbeResult,
    StreamFingerprints,
    WeightSyncError,
    engine_probe,
    probe_prompt,
    trainer_logprobs,
)

logger = logging.getLogger(__name__)


BucketFilter = Callable[[int, list[tuple[str, torch.Tensor]]], list[tuple[str, torch.Tensor]]]
"""(bucket index, tensors) -> the tensors handed to the engine, applied after the trainer-side
fingerprints are recorded: the transport between gather and engine. ``WeightSync`` uses the
identity unless given one (tests give one that corrupts a bucket, as a faulty link would)."""


@dataclass
class SyncMetrics:
    """What one sync did on this rank (the pushing rank has every field)."""

    version: int
    pushed: bool
    """This rank fed an engine."""
    seconds: float = 0.0
    """Wall time of the whole sync on this rank."""
    gather_seconds: float = 0.0
    """Inside the executor: collectives, unsharding and conversion."""
    push_seconds: float = 0.0
    """Inside the engine's update_weights, excluding the executor (pushing rank)."""
    verify_seconds: float = 0.0
    """Fingerprints (recording and comparing) and the probe."""
    buckets: int = 0
    tensors: int = 0
    bytes: int = 0
    """HF bytes handed to the engine."""
    max_bucket_bytes: int = 0
    fp8_tensors: int = 0
    """Weights pushed in blockwise FP8 (precision.rollout_fp8)."""
    probe_max_abs_diff: float | None = None
    """Largest |engine - trainer| log-prob over the probe tokens."""
    probe_mean_abs_diff: float | None = None
    """Mean of the same (checked against weight_sync.probe_tolerance)."""
    checked_tensors: int = 0
    """Tensors whose fingerprints were compared."""
    engine_rank: int | None = None
    """Per-engine sync: this rank's engine TP rank (``bytes``/``tensors`` are its payload)."""

    def as_dict(self, prefix: str = "weight_sync/") -> dict[str, Any]:
        """Flat metrics for the logger."""
        return {prefix + k: v for k, v in asdict(self).items() if v is not None}


def build_plan(
    built: BuiltModel,
    groups: ParallelGroups,
    cfg: WeightSyncConfig,
    quantization: BlockFP8 | None = None,
) -> SyncPlan:
    """Exchange metadata and plan (collective over all ranks; call once and keep the plan).

    The plan digests of all ranks are compared; a mismatch raises WeightSyncError everywhere.
    ``quantization``: blockwise FP8 rollout weights (``fp8.rollout_quantization(cfg.precision)``).
    """
    stages = collect_metadata(built.chunks, groups)
    plan = make_plan(
        stages,
        built.arch,
        padded_vocab=built.vocab.padded,
        tp_size=groups.tp_size,
        bucket_bytes=cfg.bucket_bytes,
        push_dtype=None if cfg.dtype == "model" else torch_dtype(cfg.dtype, "weight_sync.dtype"),
        quantization=quantization,
    )
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, plan.digest())
    if len(set(digests)) != 1:
        raise WeightSyncError(f"weight-sync plans differ between ranks: {digests}")
    logger.info("weight-sync plan: %s", plan.summary())
    return plan


def sync_weights(
    built: BuiltModel,
    groups: ParallelGroups,
    engine: RolloutEngine | None,
    plan: SyncPlan,
    *,
    version: int,
    cfg: WeightSyncConfig | None = None,
) -> SyncMetrics:
    """Push the trainer's current weights to ``engine`` and verify (collective, all ranks).

    Call after the optimizer step has finished writing the parameters. ``engine`` is the
    engine object on the rank(s) that hold one and None elsewhere. Bucket size and push dtype
    are the plan's; ``cfg`` only chooses the checks.
    """
    return _sync_single(built, groups, engine, plan, version, cfg or WeightSyncConfig(), None)


def _sync_single(
    built: BuiltModel,
    groups: ParallelGroups,
    engine: RolloutEngine | None,
    plan: SyncPlan,
    version: int,
    cfg: WeightSyncConfig,
    bucket_filter: BucketFilter | None,
) -> SyncMetrics:
    start = time.perf_counter()
    metrics = SyncMetrics(version=version, pushed=engine is not None)
    engine_rank = _engine_rank_of_my_mp_group(engine, groups)
    buckets = iter_hf_buckets(
        plan, built.chunks, groups, built.arch, built.vocab.padded, materialize=engine is not None
    )
    error: str | None = None
    fingerprints = _fingerprints(cfg) if engine is not None else None
    if engine is not None:
        error = _push(engine, buckets, version, fingerprints, bucket_filter, metrics)
    elif engine_rank is not None:  # a peer of the pushing rank: join the collectives
        metrics.gather_seconds = _drain(buckets)[1]
    # else: a data-parallel replica without an engine has nothing to gather
    t0 = time.perf_counter()
    if engine is not None and error is None and fingerprints is not None:
        error = fingerprints.check(engine)
        metrics.checked_tensors = len(fingerprints.expected)
    if cfg.verify != "none" and engine_rank is not None:
        probe, probe_error = _probe(built, groups, engine, engine_rank, cfg, skip=error is not None)
        error = error or _record_probe(metrics, probe, probe_error)
    metrics.verify_seconds += time.perf_counter() - t0
    _agree(error, version)
    metrics.seconds = time.perf_counter() - start
    if engine is not None:
        logger.info(
            "weight sync v%d: %d tensors%s, %.1f MiB in %d bucket(s), %.2f s (gather %.2f, "
            "push %.2f, verify %.2f)%s",
            version, metrics.tensors,
            f" ({metrics.fp8_tensors} in FP8)" if metrics.fp8_tensors else "",
            metrics.bytes / 2**20, metrics.buckets, metrics.seconds,
            metrics.gather_seconds, metrics.push_seconds, metrics.verify_seconds,
            "" if metrics.probe_mean_abs_diff is None
            else f"; probe |dlogp| mean {metrics.probe_mean_abs_diff:.2e} max "
            f"{metrics.probe_max_abs_diff:.2e}",
        )  # fmt: skip
    return metrics


def sync_engine_weights(
    built: BuiltModel,
    groups: ParallelGroups,
    engine: RolloutEngine | None,
    plan: SyncPlan,
    ranks: EngineRanks,
    *,
    version: int,
    cfg: WeightSyncConfig | None = None,
    engine_kind: EngineKind = "hf",
    sglang_bucket_bytes: int = 512 * 1024 * 1024,
) -> SyncMetrics:
    """Per-engine sync (per_engine.py): every rank feeds the engine TP rank on its GPU.

    Collective over all ranks; every rank belongs to one engine. ``engine`` is the engine
    object on each engine's lead (``ranks.engine_rank == 0``) and None elsewhere; it must
    implement ``update_weights_from_ranks`` (HFEngine, SGLangEngine). Every engine is verified.
    """
    return _sync_per_engine(
        built, groups, engine, plan, ranks, version, cfg or WeightSyncConfig(),
        encoder_for(engine_kind, sglang_bucket_bytes), None,
    )  # fmt: skip


def _sync_per_engine(
    built: BuiltModel,
    groups: ParallelGroups,
    engine: RolloutEngine | None,
    plan: SyncPlan,
    ranks: EngineRanks,
    version: int,
    cfg: WeightSyncConfig,
    encoder: RankEncoder,
    bucket_filter: BucketFilter | None,
) -> SyncMetrics:
    check_engine_placement(engine, ranks)
    start = time.perf_counter()
    metrics = SyncMetrics(version=version, pushed=ranks.is_lead, engine_rank=ranks.engine_rank)
    fingerprints = _fingerprints(cfg) if ranks.is_lead else None
    state: dict[str, Any] = {"executor_error": None}

    def on_bucket(bucket: HFBucket) -> list[tuple[str, torch.Tensor]]:
        metrics.buckets += 1
        metrics.max_bucket_bytes = max(metrics.max_bucket_bytes, bucket.nbytes)
        metrics.fp8_tensors += sum(t.dtype == FP8_DTYPE for _, t in bucket.tensors)
        t0 = time.perf_counter()
        for name, tensor in bucket.tensors if fingerprints is not None else ():
            fingerprints.record(name, tensor)
        metrics.verify_seconds += time.perf_counter() - t0
        if bucket_filter is None:
            return bucket.tensors
        return list(bucket_filter(bucket.index, bucket.tensors))

    stream = rank_payload_stream(
        plan, built, groups, ranks, encoder, on_bucket=on_bucket, state=state
    )
    error: str | None = None
    t0 = time.perf_counter()
    if engine is not None:
        try:
            engine.update_weights_from_ranks(stream, version=version)  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - any engine failure becomes a sync error
            if state["executor_error"] is not None:
                raise state["executor_error"] from None
            logger.exception("engine.update_weights_from_ranks failed; draining for the peers")
            error = f"engine.update_weights_from_ranks raised {type(exc).__name__}: {exc}"
    left = drain(stream)
    if engine is not None and error is None and left:
        error = f"engine stopped reading the per-rank payloads with {left} bucket(s) left"
    metrics.gather_seconds = state.get("gather_seconds", 0.0)
    metrics.bytes, metrics.tensors = state.get("bytes", 0), state.get("pieces", 0)
    metrics.push_seconds = time.perf_counter() - t0 - metrics.gather_seconds - metrics.verify_seconds
    t1 = time.perf_counter()
    if engine is not None and error is None and fingerprints is not None:
        error = fingerprints.check(engine)
        metrics.checked_tensors = len(fingerprints.expected)
    probe, probe_error = _probe_every_engine(built, groups, engine, cfg, skip=error is not None)
    error = error or _record_probe(metrics, probe, probe_error)
    metrics.verify_seconds += time.perf_counter() - t1
    _agree(error, version)
    state.clear()  # the last bucket's keep-alive: every engine has read it
    metrics.seconds = time.perf_counter() - start
    return metrics


def _probe_every_engine(
    built: BuiltModel,
    groups: ParallelGroups,
    engine: RolloutEngine | None,
    cfg: WeightSyncConfig,
    skip: bool,
) -> tuple[ProbeResult | None, str | None]:
    """Probe, one after the other, every engine whose lead is in this rank's model-parallel
    group (all of the group's ranks run the trainer side of each); this lead's result."""
    if cfg.verify == "none":
        return None, None
    leads: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(leads, engine is not None)
    me, result = dist.get_rank(), (None, None)
    for lead in [r for r in dist.get_process_group_ranks(groups.pg_collection.mp) if leads[r]]:
        mine = engine if lead == me else None
        outcome = _probe(built, groups, mine, lead, cfg, skip=skip)
        if mine is not None:
            result = outcome
    return result


class WeightSync:
    """Plan once, sync at every step: ``sync = WeightSync(built, groups, engine, cfg)``,
    then ``sync(version=step)`` on every rank after each optimizer step.

    ``quantization`` (``fp8.rollout_quantization(cfg.precision)``) pushes blockwise FP8
    weights; an engine that cannot hold them is wrapped in ``fp8.DequantizingEngine``.

    One engine per group of GPUs: pass ``engine_rank`` (this rank's TP rank in its engine),
    ``engine_tp`` and ``engine_group`` (gloo group over the engine's ranks, lead first) on
    every rank, and ``engine`` on each engine's lead; ``engine_kind`` ('hf' or 'sglang') picks
    the payload (per_engine.py). Without them: the single-engine path (``sync_weights``).

    ``bucket_filter`` (``BucketFilter``) stands between the gathered buckets and the engine,
    after the fingerprints are taken; the default is the identity."""

    def __init__(
        self,
        built: BuiltModel,
        groups: ParallelGroups,
        engine: RolloutEngine | None,
        cfg: WeightSyncConfig | None = None,
        quantization: BlockFP8 | None = None,
        *,
        engine_rank: int | None = None,
        engine_tp: int | None = None,
        engine_group: Any = None,
        engine_kind: EngineKind = "hf",
        sglang_bucket_bytes: int = 512 * 1024 * 1024,
        bucket_filter: BucketFilter | None = None,
    ) -> None:
        self.built, self.groups, self.engine = built, groups, engine
        self.cfg = cfg or WeightSyncConfig()
        self.quantization = quantization
        self._plan: SyncPlan | None = None
        given = [x is not None for x in (engine_rank, engine_tp, engine_group)]
        if any(given) and not all(given):
            raise ValueError("pass engine_rank, engine_tp and engine_group together (or none)")
        self.ranks = (
            EngineRanks(engine_rank, engine_tp, engine_group) if all(given) else None  # type: ignore[arg-type]
        )
        self.engine_kind, self.sglang_bucket_bytes = engine_kind, sglang_bucket_bytes
        self.bucket_filter = bucket_filter

    @property
    def plan(self) -> SyncPlan:
        """The cached plan (built collectively on first use)."""
        if self._plan is None:
            self._plan = build_plan(self.built, self.groups, self.cfg, self.quantization)
        return self._plan

    def __call__(self, *, version: int) -> SyncMetrics:
        """One sync (``sync_engine_weights`` per engine, else ``sync_weights``)."""
        if self.ranks is not None:
            return _sync_per_engine(
                self.built, self.groups, self.engine, self.plan, self.ranks, version, self.cfg,
                encoder_for(self.engine_kind, self.sglang_bucket_bytes), self.bucket_filter,
            )  # fmt: skip
        return _sync_single(
            self.built, self.groups, self.engine, self.plan, version, self.cfg, self.bucket_filter
        )


# ----------------------------------------------------------------------------- pushing rank


def _fingerprints(cfg: WeightSyncConfig) -> StreamFingerprints | None:
    if cfg.verify == "checksum":
        return StreamFingerprints(cfg.checksum_rows)
    if cfg.verify == "full":
        return StreamFingerprints(None)
    return None


def _push(
    engine: RolloutEngine,
    buckets: Iterator[HFBucket],
    version: int,
    fingerprints: StreamFingerprints | None,
    bucket_filter: BucketFilter | None,
    metrics: SyncMetrics,
) -> str | None:
    t0 = time.perf_counter()
    state = {"executor_error": None}
    error = None
    stream = _stream(buckets, fingerprints, bucket_filter, metrics, state)
    try:
        report = engine.update_weights(stream, version=version)
    except Exception as exc:  # noqa: BLE001 - any engine failure becomes a sync error
        if state["executor_error"] is not None:
            raise state["executor_error"] from None
        logger.exception("engine.update_weights failed; draining the stream for the peers")
        error = f"engine.update_weights raised {type(exc).__name__}: {exc}"
        report = None
    stream.close()  # frees the bucket the engine stopped in before the drain gathers more
    left, seconds = _drain(buckets)
    metrics.gather_seconds += seconds
    if error is None and left:
        error = f"engine stopped reading the weight stream with {left} bucket(s) left"
    missing = getattr(report, "not_updated", None)
    if error is None and missing:
        error = f"engine parameters not in the weight stream (left stale): {missing[:8]}"
    metrics.push_seconds = (
        time.perf_counter() - t0 - metrics.gather_seconds - metrics.verify_seconds
    )
    return error


def _stream(
    buckets: Iterator[HFBucket],
    fingerprints: StreamFingerprints | None,
    bucket_filter: BucketFilter | None,
    metrics: SyncMetrics,
    state: dict,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Flatten buckets into (name, tensor), timing the executor and recording fingerprints.

    Holds no reference to bucket i while the executor gathers bucket i + 1.
    """
    while True:
        t0 = time.perf_counter()
        try:
            bucket = next(buckets)
        except StopIteration:
            return
        except Exception as exc:
            state["executor_error"] = exc
            raise
        metrics.gather_seconds += time.perf_counter() - t0
        index, tensors = bucket.index, bucket.tensors
        metrics.buckets += 1
        metrics.tensors += len(tensors)
        metrics.max_bucket_bytes = max(metrics.max_bucket_bytes, bucket.nbytes)
        metrics.bytes += bucket.nbytes
        metrics.fp8_tensors += sum(t.dtype == FP8_DTYPE for _, t in tensors)
        del bucket
        if fingerprints is not None:
            t1 = time.perf_counter()
            for name, tensor in tensors:
                fingerprints.record(name, tensor)
            metrics.verify_seconds += time.perf_counter() - t1
        if bucket_filter is not None:
            tensors = list(bucket_filter(index, tensors))
        tensors.reverse()
        while tensors:  # pop: the consumer's reference is the only one left
            yield tensors.pop()


def _drain(buckets: Iterator[HFBucket]) -> tuple[int, float]:
    """Run the remaining buckets' collectives; (buckets left, seconds)."""
    t0 = time.perf_counter()
    left = sum(1 for _ in buckets)
    return left, time.perf_counter() - t0


# ----------------------------------------------------------------------------- all ranks


def _engine_rank_of_my_mp_group(engine: RolloutEngine | None, groups: ParallelGroups) -> int | None:
    """Global rank of the engine holder in this rank's model-parallel group (None: no engine)."""
    holders: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(holders, engine is not None)
    mine = [r for r in dist.get_process_group_ranks(groups.pg_collection.mp) if holders[r]]
    if len(mine) > 1:
        raise WeightSyncError(f"ranks {mine} of one model-parallel group all hold an engine")
    return mine[0] if mine else None


def _probe(
    built: BuiltModel,
    groups: ParallelGroups,
    engine: RolloutEngine | None,
    engine_rank: int,
    cfg: WeightSyncConfig,
    *,
    skip: bool,
) -> tuple[ProbeResult | None, str | None]:
    """Engine greedy log-probs vs the trainer's (collective over the model-parallel group)."""
    mp_group = groups.pg_collection.mp
    payload: list[Any] = [None]
    error = None
    if engine is not None and not skip:
        prompt = probe_prompt(built.arch.vocab_size, cfg.probe_prompt_tokens, cfg.probe_seed)
        try:
            response, engine_lps = engine_probe(engine, prompt, cfg.probe_new_tokens)
            payload = [(prompt, response, engine_lps)]
        except Exception as exc:  # noqa: BLE001 - reported through the agreement step
            logger.exception("probe generation failed")
            error = f"probe: engine.generate raised {type(exc).__name__}: {exc}"
    dist.broadcast_object_list(payload, src=engine_rank, group=mp_group)
    if payload[0] is None:
        return None, error
    prompt, response, engine_lps = payload[0]
    local = trainer_logprobs(built, groups, prompt, response)
    gathered: list[Any] = [None] * dist.get_world_size(mp_group)
    dist.all_gather_object(gathered, local, group=mp_group)
    trainer_lps = next(x for x in gathered if x is not None)
    result = ProbeResult(response, engine_lps, trainer_lps)
    return result, result.error(cfg.probe_tolerance) if engine is not None else None


def _record_probe(
    metrics: SyncMetrics, probe: ProbeResult | None, error: str | None
) -> str | None:
    """Copy the probe's differences into the metrics; pass its error on."""
    if probe is not None:
        metrics.probe_max_abs_diff = probe.max_abs_diff
        metrics.probe_mean_abs_diff = probe.mean_abs_diff
    return error


def _agree(error: str | None, version: int) -> None:
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = {r: e for r, e in enumerate(errors) if e is not None}
    if failed:
        lines = "; ".join(f"rank {r}: {e}" for r, e in failed.items())
        raise WeightSyncError(f"weight sync v{version} failed verification: {lines}")
