"""Where the rollout engines run: engine index, engine rank and lead rank of every global rank.

A run has ``world_size / rollout.gpus_per_engine`` engines (``gpus_per_engine`` defaults to the
trainer's tensor-parallel size). Engine ``e`` owns the consecutive global ranks
``e * gpus_per_engine ... (e + 1) * gpus_per_engine - 1``; the first of them, its *lead rank*,
builds and drives it (the other ranks are its engine ranks 1, 2, ...). With Megatron's rank
order (tensor parallel fastest) and ``gpus_per_engine = TP``, an engine's ranks are one
tensor-parallel group: the trainer ranks on the engine's GPUs.

* **colocated**: engine ``e`` runs on the GPUs of its own ranks, so its first GPU on the node
  (SGLang's ``--base-gpu-id``) is the lead rank's local GPU index.
* **disaggregated**: the engines have GPUs of their own on each node, starting at
  ``engine_gpu_offset`` (e.g. 4 on an 8-GPU node whose GPUs 0-3 train); engine ``e`` is still
  driven by its lead rank and takes the ``gpus_per_engine`` GPUs after those of the engines on
  the same node before it.

The HF engine gets the same placement on CPU (one process per engine, on its lead rank), so
everything built on it is tested without a GPU. Pure arithmetic: no torch, no process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_rpt.errors import ConfigError


@dataclass(frozen=True)
class EngineSlot:
    """One global rank's place in the fleet."""

    engine: int
    """Index of the engine this rank belongs to."""
    engine_rank: int
    """This rank's rank inside the engine (0: the lead)."""
    lead_rank: int
    """Global rank that builds and drives the engine."""

    @property
    def is_lead(self) -> bool:
        """This rank drives its engine."""
        return self.engine_rank == 0


@dataclass(frozen=True)
class EnginePlacement:
    """The fleet's layout over ``world_size`` ranks (see the module docstring).

    >>> p = EnginePlacement(world_size=8, gpus_per_engine=2, gpus_per_node=4)
    >>> p.num_engines, p.slot(5), p.leads()
    (4, EngineSlot(engine=2, engine_rank=1, lead_rank=4), [0, 2, 4, 6])
    >>> [p.base_gpu_id(e) for e in range(4)]
    [0, 2, 0, 2]
    >>> d = EnginePlacement(world_size=8, gpus_per_engine=2, gpus_per_node=4,
    ...                     mode="disaggregated", engine_gpu_offset=4)
    >>> [d.base_gpu_id(e) for e in range(4)]
    [4, 6, 4, 6]
    """

    world_size: int
    gpus_per_engine: int
    gpus_per_node: int | None = None
    """Ranks (GPUs) per node; None: one node holds every rank."""
    mode: Literal["colocated", "disaggregated"] = "colocated"
    engine_gpu_offset: int = 0
    """Disaggregated: first GPU index of the engines on every node."""

    def __post_init__(self) -> None:
        g, w = self.gpus_per_engine, self.world_size
        if g < 1 or w % g:
            raise ConfigError(
                f"rollout.gpus_per_engine={g} must divide the world size {w} "
                "(every rank belongs to exactly one engine)"
            )
        node = self.node_size
        if node % g and g % node:
            raise ConfigError(
                f"rollout.gpus_per_engine={g} and {node} GPUs per node: an engine must fill "
                "whole nodes or fit a whole number of times into one"
            )

    @property
    def node_size(self) -> int:
        """Ranks per node."""
        return self.gpus_per_node or self.world_size

    @property
    def num_engines(self) -> int:
        """``world_size / gpus_per_engine``."""
        return self.world_size // self.gpus_per_engine

    def slot(self, rank: int) -> EngineSlot:
        """Engine index, engine rank and lead rank of global rank ``rank``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size}")
        engine, engine_rank = divmod(rank, self.gpus_per_engine)
        return EngineSlot(engine, engine_rank, engine * self.gpus_per_engine)

    def ranks(self, engine: int) -> range:
        """The global ranks of engine ``engine`` (its lead first)."""
        return range(engine * self.gpus_per_engine, (engine + 1) * self.gpus_per_engine)

    def leads(self) -> list[int]:
        """The lead rank of every engine, in engine order."""
        return [self.ranks(e).start for e in range(self.num_engines)]

    def base_gpu_id(self, engine: int) -> int:
        """First GPU of engine ``engine`` on its node (SGLang's ``--base-gpu-id``)."""
        local_lead = self.ranks(engine).start % self.node_size
        if self.mode == "colocated":
            return local_lead
        return self.engine_gpu_offset + local_lead


def default_gpus_per_engine(gpus_per_engine: int | None, tensor_parallel: int) -> int:
    """``rollout.gpus_per_engine``, or the trainer's tensor-parallel size when unset.

    >>> default_gpus_per_engine(None, 4), default_gpus_per_engine(8, 4)
    (4, 8)
    """
    return tensor_parallel if gpus_per_engine is None else int(gpus_per_engine)


__all__ = ["EnginePlacement", "EngineSlot", "default_gpus_per_engine"]
