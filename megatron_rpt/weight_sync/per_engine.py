"""Weight sync into one engine per group of GPUs: every trainer rank feeds the engine TP rank
on its own GPU.

Placement (decided by the caller and passed in as ``EngineRanks``): the engine ranks of one
engine are trainer ranks that share its GPUs; ``group`` is a process group over exactly those
ranks (gloo: only CPU objects travel on it), group rank = engine TP rank, and group rank 0 is
the engine's *lead*, the rank that holds the engine object and drives it.

Per bucket of the plan, on every rank (all engines at once)::

    gather.py      PP broadcast + TP all-gather inside the model-parallel replica -> full HF
                   tensors on every rank (no traffic between replicas)
    engine_plan    cut this rank's payload: its slice (HF engine) or every full tensor (SGLang)
    encode         HF engine: the pieces as CPU tensors; SGLang: per-dtype flattened buckets
                   serialized as CUDA-IPC handles of *this* GPU's memory
    gather_object  the encoded payloads -> the lead, over the engine's group
    lead           engine.update_weights_from_ranks(stream of [payload of rank 0..E-1])

So no engine rank maps another GPU's memory, and the sync time does not depend on the number
of replicas (each replica gathers on its own links; the engines load in parallel).

Bucket lifetime (SGLang): a rank keeps the memory behind its IPC handles until the gather of
the *next* bucket returns. The lead enters that gather only after its engine has loaded and
fenced the bucket (``SGLangEngine.update_weights_from_ranks`` fences every bucket), so the
memory is never freed while the server reads it. The last bucket is held until the final
agreement, which the lead reaches after its engine returned.

Verification runs on every engine: the lead records fingerprints of its full tensors and checks
the engine's (``checksum`` / ``full``), and every engine's lead runs the log-prob probe against
the trainer's forward over its model-parallel group. Failures are agreed on by all ranks
exactly as in push.py, so one broken engine raises ``WeightSyncError`` everywhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch.distributed as dist

from megatron_rpt.distributed import ParallelGroups
from megatron_rpt.model.build import BuiltModel
from megatron_rpt.rollout.rank_shards import ShardPiece
from megatron_rpt.rollout.sglang_protocol import rank_bucket_payload
from megatron_rpt.rollout.types import RolloutEngine
from megatron_rpt.weight_sync.engine_plan import rank_pieces
from megatron_rpt.weight_sync.gather import HFBucket, iter_hf_buckets
from megatron_rpt.weight_sync.plan import SyncPlan

logger = logging.getLogger(__name__)

EngineKind = Literal["hf", "sglang"]


@dataclass(frozen=True)
class EngineRanks:
    """This rank's place in its engine (module docstring)."""

    engine_rank: int
    """This rank's engine TP rank (its rank in ``group``)."""
    engine_tp: int
    """Ranks (GPUs) of the engine."""
    group: Any
    """Process group over the engine's ranks, group rank = engine TP rank (gloo)."""

    def __post_init__(self) -> None:
        size, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if (size, rank) != (self.engine_tp, self.engine_rank):
            raise ValueError(
                f"engine group has size {size} and puts this rank at {rank}, but engine_tp="
                f"{self.engine_tp} and engine_rank={self.engine_rank} were given"
            )

    @property
    def is_lead(self) -> bool:
        """This rank holds the engine object."""
        return self.engine_rank == 0

    @property
    def lead(self) -> int:
        """Global rank of the engine's lead."""
        return dist.get_global_rank(self.group, 0)


class RankEncoder(Protocol):
    """Turns one rank's pieces into what travels to the lead."""

    whole: bool
    """Every engine rank receives full tensors (the engine slices them itself)."""

    def encode(self, pieces: list[ShardPiece]) -> tuple[Any, Any]:
        """``(payload for the lead, keep-alive held until the lead's engine has read it)``."""
        ...


class ShardEncoder:
    """HF engine: the rank's slices as CPU tensors (pickled to the lead)."""

    whole = False

    def encode(self, pieces: list[ShardPiece]) -> tuple[Any, Any]:
        """CPU copies of the pieces; nothing to keep alive."""
        return [p._replace(tensor=p.tensor.detach().cpu()) for p in pieces], None


class SGLangIPCEncoder:
    """SGLang: full tensors of this GPU, flattened per dtype and serialized as IPC handles."""

    whole = True

    def __init__(self, bucket_bytes: int) -> None:
        self.bucket_bytes = bucket_bytes

    def encode(self, pieces: list[ShardPiece]) -> tuple[Any, Any]:
        """Serialized per-dtype buckets; the flattened buckets are the keep-alive."""
        buckets, serialized = rank_bucket_payload(
            [(p.name, p.tensor) for p in pieces], self.bucket_bytes
        )
        return serialized, buckets


def encoder_for(kind: EngineKind, sglang_bucket_bytes: int = 512 * 1024 * 1024) -> RankEncoder:
    """The encoder of an engine kind (``rollout.engine``)."""
    if kind == "hf":
        return ShardEncoder()
    if kind == "sglang":
        return SGLangIPCEncoder(sglang_bucket_bytes)
    raise ValueError(f"unknown engine kind {kind!r}; expected 'hf' or 'sglang'")


def rank_payload_stream(
    plan: SyncPlan,
    built: BuiltModel,
    groups: ParallelGroups,
    ranks: EngineRanks,
    encoder: RankEncoder,
    *,
    on_bucket: Any = None,
    state: dict,
) -> Iterator[list[Any] | None]:
    """Per bucket: gather, cut, encode, gather to the lead; collective over the world.

    Yields the list of every engine rank's payload on the lead and None elsewhere.
    ``on_bucket(bucket) -> tensors`` sees (and may replace) the full tensors before they are
    cut (fingerprints, the bucket filter, metrics). ``state["keep"]`` holds the keep-alive of the
    last bucket (drop it after the final agreement); ``state["executor_error"]`` is set when
    the executor itself failed.
    """
    buckets = iter_hf_buckets(plan, built.chunks, groups, built.arch, built.vocab.padded)
    lead = ranks.lead
    while True:
        t0 = time.perf_counter()
        try:
            bucket: HFBucket = next(buckets)
        except StopIteration:
            return
        except Exception as exc:
            state["executor_error"] = exc
            raise
        state["gather_seconds"] = state.get("gather_seconds", 0.0) + time.perf_counter() - t0
        tensors = bucket.tensors if on_bucket is None else on_bucket(bucket)
        del bucket
        pieces = rank_pieces(tensors, ranks.engine_rank, ranks.engine_tp, whole=encoder.whole)
        del tensors
        state["bytes"] = state.get("bytes", 0) + sum(p.tensor.nbytes for p in pieces)
        state["pieces"] = state.get("pieces", 0) + len(pieces)
        payload, keep = encoder.encode(pieces)
        del pieces
        gathered: list[Any] | None = [None] * ranks.engine_tp if ranks.is_lead else None
        dist.gather_object(payload, gathered, dst=lead, group=ranks.group)
        state["keep"] = keep  # the previous bucket's memory is released only now
        del payload
        yield gathered


def drain(stream: Iterator[Any]) -> int:
    """Run the remaining buckets' collectives; how many were left."""
    return sum(1 for _ in stream)


def check_engine_placement(engine: RolloutEngine | None, ranks: EngineRanks) -> None:
    """The lead, and only the lead, holds the engine object."""
    if ranks.is_lead and engine is None:
        raise ValueError("the lead rank of an engine (engine_rank 0) must pass its engine")
    if not ranks.is_lead and engine is not None:
        raise ValueError(f"engine rank {ranks.engine_rank} holds an engine; only rank 0 may")


__all__ = [
    "EngineKind",
    "EngineRanks",
    "RankEncoder",
    "SGLangIPCEncoder",
    "ShardEncoder",
    "drain",
    "encoder_for",
    "rank_payload_stream",
]
