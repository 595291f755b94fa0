r"""The weight-sync plan: which HF tensors a sync produces, from which Megatron parameters,
owned by which pipeline stage, in which order and in which buckets. Pure: no process groups.

The path of one sync (plan once, then execute at every step)::

    plan.py    metadata of every stage (all_gather_object, once) -> SyncPlan: HF names and
               shapes, owner stage, TP partitioning, buckets of <= bucket_bytes
    ---------- per bucket, on every rank of the model-parallel group (gather.py) ----------
    PP broadcast   the owner stage's shard -> the same TP rank of every stage
    TP all-gather  every TP rank's shard -> full tensor (partition_dim / partition_stride)
    convert        the name table: QKV and gate/up split, vocabulary padding rows dropped,
                   tied output layer never emitted; cast to the push dtype, or (rollout FP8)
                   blockwise FP8 + weight_scale_inv for decoder linear weights (fp8.py)
    bucket         yield one HFBucket; nothing of it is kept once the consumer drops it
    ---------- on the rank holding the engine (push.py) -----------------------------------
    push           engine.update_weights(stream of (hf_name, tensor))
    verify         stream fingerprints vs engine.weight_checksums; probe: engine greedy
                   log-probs vs the trainer's forward (verify.py)
    agree          all ranks all-gather the outcome; any failure -> WeightSyncError everywhere

Synchronization guarantees:

* every rank issues the same collectives in the same order: the plan is a pure function of
  the gathered metadata, and its ``digest`` is compared across ranks before the first sync
  (mismatched collectives would hang or, worse, pair tensors of different parameters);
* within a bucket every PP broadcast completes before the TP all-gathers start, and those
  complete before conversion; bucket i + 1's collectives start only when the consumer asks
  for it, so one bucket is in flight (extra memory about ``bucket_bytes``);
* a tensor handed to the engine is never written again by the sync, so an engine that keeps a
  reference until its own copies are done (SGLang's fence) reads stable memory;
* an engine failure mid-stream never deadlocks the peers (the pushing rank drains the rest of
  the stream), and a failed check raises on every rank, not only where it was seen.

Rules:

* full shape = local shape with ``partition_dim`` multiplied by TP;
* a parameter reported by several stages keeps the lowest owning stage (identical metadata
  required);
* tied embeddings: the last stage's ``output_layer.weight`` of a tied model (PP > 1) exports
  to nothing (``tied_vocab``), so it is listed in ``skipped`` and never gathered; the embedding
  is emitted once as ``model.embed_tokens.weight``;
* HF shapes come from running the conversion transform on meta tensors (vocabulary padding
  rows are dropped there); every HF name must be produced exactly once;
* buckets are filled greedily in plan order up to ``bucket_bytes`` of full Megatron tensors in
  the model dtype (what the executor materialises); a larger tensor gets a bucket of its own;
* with a ``BlockFP8`` quantization, each quantized HF weight is listed in FP8 and followed by
  its ``*.weight_scale_inv`` (fp32); other tensors keep the push dtype.

>>> import torch
>>> from megatron_rpt.model.arch import arch_from_dict
>>> arch = arch_from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 8,
...     "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 1,
...     "intermediate_size": 16, "vocab_size": 10, "tie_word_embeddings": True})
>>> f32 = torch.float32
>>> stage = [ParamMeta("embedding.word_embeddings.weight", (8, 8), f32, 0, 1, 0),
...          ParamMeta("decoder.layers.0.mlp.linear_fc1.weight", (16, 8), f32, 0, 2, 0)]
>>> plan = make_plan([stage], arch, padded_vocab=16, tp_size=2, bucket_bytes=600)
>>> [(t.name, t.full_shape, [o.name for o in t.outputs]) for b in plan.buckets for t in b.tasks]
... # doctest: +NORMALIZE_WHITESPACE
[('embedding.word_embeddings.weight', (16, 8), ['model.embed_tokens.weight']),
 ('decoder.layers.0.mlp.linear_fc1.weight', (32, 8),
  ['model.layers.0.mlp.gate_proj.weight', 'model.layers.0.mlp.up_proj.weight'])]
>>> [b.nbytes for b in plan.buckets], plan.hf_tensors()[0].shape
([512, 1024], (10, 8))
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_rpt.conversion.converter import WeightConverter
from megatron_rpt.model.arch import ArchSpec
from megatron_rpt.weight_sync.fp8 import BlockFP8


@dataclass(frozen=True)
class ParamMeta:
    """What one rank reports about one of its parameters."""

    name: str
    """Canonical Megatron name (no wrapper prefix, global layer index)."""
    local_shape: tuple[int, ...]
    """Shape of this rank's shard."""
    dtype: torch.dtype
    """Parameter dtype (the model dtype)."""
    partition_dim: int | None
    """TP-split dimension, or None when the parameter is replicated across TP."""
    partition_stride: int
    """Megatron's partition stride (2 for the SwiGLU ``linear_fc1``; see tp_sharding.py)."""
    pp_rank: int
    """Pipeline stage holding the parameter."""


@dataclass(frozen=True)
class HFTensorSpec:
    """One HF tensor the sync pushes."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    """Dtype as pushed (the model dtype unless weight_sync.dtype says otherwise)."""

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor."""
        return _nbytes(self.shape, self.dtype)


@dataclass(frozen=True)
class ParamTask:
    """Gather one Megatron parameter and convert it into its HF tensors."""

    name: str
    owner_pp_rank: int
    local_shape: tuple[int, ...]
    full_shape: tuple[int, ...]
    dtype: torch.dtype
    partition_dim: int | None
    partition_stride: int
    transform: str
    """Name of the conversion transform (conversion/transforms.py)."""
    outputs: tuple[HFTensorSpec, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the full (gathered) Megatron tensor."""
        return _nbytes(self.full_shape, self.dtype)


@dataclass(frozen=True)
class Bucket:
    """Tasks whose full tensors are materialised together."""

    index: int
    tasks: tuple[ParamTask, ...]
    nbytes: int
    """Bytes of the bucket's full Megatron tensors."""


@dataclass(frozen=True)
class SyncPlan:
    """The ordered, bucketed list of everything one sync does (module docstring)."""

    buckets: tuple[Bucket, ...]
    tp_size: int
    pp_size: int
    bucket_bytes: int
    skipped: tuple[str, ...]
    """Megatron parameters that export to no HF tensor (the tied output layer at PP > 1)."""
    quantization: BlockFP8 | None = None
    """Blockwise FP8 rollout weights (precision.rollout_fp8), applied after conversion."""

    def hf_tensors(self) -> list[HFTensorSpec]:
        """Every pushed HF tensor, in stream order."""
        return [o for b in self.buckets for t in b.tasks for o in t.outputs]

    @property
    def hf_bytes(self) -> int:
        """Bytes pushed to the engine per sync."""
        return sum(o.nbytes for o in self.hf_tensors())

    def digest(self) -> str:
        """Hash of everything that decides the collectives (compared across ranks)."""
        text = repr(
            (self.tp_size, self.pp_size, self.bucket_bytes, self.skipped, self.buckets)
            + (self.quantization,)
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def summary(self) -> str:
        """One line for the log."""
        big = max((b.nbytes for b in self.buckets), default=0)
        return (
            f"{len(self.hf_tensors())} HF tensors ({self.hf_bytes / 2**20:.1f} MiB) from "
            f"{sum(len(b.tasks) for b in self.buckets)} Megatron parameters in "
            f"{len(self.buckets)} bucket(s) (largest {big / 2**20:.1f} MiB) at "
            f"TP={self.tp_size} PP={self.pp_size}"
            + ("" if self.quantization is None else f"; {self._fp8_summary()}")
        )

    def _fp8_summary(self) -> str:
        assert self.quantization is not None
        n = sum(o.dtype == torch.float8_e4m3fn for o in self.hf_tensors())
        b = self.quantization.block_size
        return f"{n} weights in blockwise FP8 ({b}x{b}, e4m3, weight_scale_inv)"


def make_plan(
    stages: Sequence[Sequence[ParamMeta]],
    arch: ArchSpec,
    *,
    padded_vocab: int,
    tp_size: int,
    bucket_bytes: int,
    push_dtype: torch.dtype | None = None,
    quantization: BlockFP8 | None = None,
) -> SyncPlan:
    """The plan for metadata ``stages`` (one list per PP rank, each in that rank's order).

    ``quantization``: blockwise FP8 rollout weights (see fp8.py).
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    converter = WeightConverter(arch, padded_vocab)
    metas = _merge_stages(stages)
    tasks: list[ParamTask] = []
    skipped: list[str] = []
    produced: dict[str, str] = {}
    for meta in metas:
        task = _task(meta, converter, tp_size, push_dtype, quantization)
        if not task.outputs:
            skipped.append(meta.name)
            continue
        for out in task.outputs:
            if out.name in produced:
                raise ValueError(
                    f"HF tensor {out.name!r} would be produced by both {produced[out.name]!r} "
                    f"and {meta.name!r}"
                )
            produced[out.name] = meta.name
        tasks.append(task)
    return SyncPlan(
        buckets=_bucketize(tasks, bucket_bytes),
        tp_size=tp_size,
        pp_size=len(stages),
        bucket_bytes=bucket_bytes,
        skipped=tuple(skipped),
        quantization=quantization,
    )


def _merge_stages(stages: Sequence[Sequence[ParamMeta]]) -> list[ParamMeta]:
    merged: dict[str, ParamMeta] = {}
    for pp_rank, stage in enumerate(stages):
        for meta in stage:
            assert meta.pp_rank == pp_rank, (meta, pp_rank)
            old = merged.get(meta.name)
            if old is None:
                merged[meta.name] = meta
                continue
            same = (old.local_shape, old.dtype, old.partition_dim, old.partition_stride) == (
                meta.local_shape,
                meta.dtype,
                meta.partition_dim,
                meta.partition_stride,
            )
            if not same:
                raise ValueError(
                    f"parameter {meta.name!r} differs between PP stages {old.pp_rank} and "
                    f"{pp_rank}: {old} vs {meta}"
                )
    return list(merged.values())


def _task(
    meta: ParamMeta,
    converter: WeightConverter,
    tp_size: int,
    push_dtype: torch.dtype | None,
    quantization: BlockFP8 | None,
) -> ParamTask:
    full = list(meta.local_shape)
    if meta.partition_dim is not None:
        full[meta.partition_dim] *= tp_size
    row, _ = converter.row(meta.name)  # CheckpointError for a parameter without a row
    dtype = push_dtype or meta.dtype
    converted = converter.megatron_to_hf(
        meta.name, torch.empty(full, dtype=meta.dtype, device="meta")
    )
    if quantization is None:
        specs = [(hf_name, tuple(t.shape), dtype) for hf_name, t in converted]
    else:
        specs = [s for n, t in converted for s in quantization.output_specs(n, t.shape, dtype)]
    outputs = tuple(HFTensorSpec(*spec) for spec in specs)
    return ParamTask(
        name=meta.name,
        owner_pp_rank=meta.pp_rank,
        local_shape=tuple(meta.local_shape),
        full_shape=tuple(full),
        dtype=meta.dtype,
        partition_dim=meta.partition_dim,
        partition_stride=meta.partition_stride,
        transform=row.transform,
        outputs=outputs,
    )


def _bucketize(tasks: list[ParamTask], bucket_bytes: int) -> tuple[Bucket, ...]:
    buckets: list[Bucket] = []
    current: list[ParamTask] = []
    size = 0
    for task in tasks:
        if current and size + task.nbytes > bucket_bytes:
            buckets.append(Bucket(len(buckets), tuple(current), size))
            current, size = [], 0
        current.append(task)
        size += task.nbytes
    if current:
        buckets.append(Bucket(len(buckets), tuple(current), size))
    return tuple(buckets)


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()
