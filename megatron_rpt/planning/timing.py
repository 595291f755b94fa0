"""Step time of an RPT step: rollout, training, weight sync (seconds).

* **Rollout** per engine (all engines run in parallel, each gets ``ceil(contexts / E)``
  groups): prefill FLOPs of its prompts (``ModelFlops.prefill``, once per group: the G
  samples share the prompt) at the stated MFU on the engine's GPUs, plus decoding its
  generated tokens at ``min(engine throughput, concurrent sequences x per-sequence speed)``
  (concurrency is bounded by the KV cache), and never faster than the longest response decoded
  alone (the tail). Engine throughput = GPUs x per-GPU throughput, x the cross-node factor
  when the engine spans nodes.
* **Training**: FLOPs of the step from the project's counter (``ModelFlops.training``: forward
  + backward, + one forward with full recompute, + extra forward-only passes), the prompt once
  per micro-batch of a group with the shared-prefix layout; at the stated MFU on all GPUs, times the 1F1B
  pipeline bubble ``1 + (p - 1) / (v * m)`` (m micro-batches per DP rank, v virtual stages).
* **Weight sync**: the model's bytes in the pushed dtype over the slowest link between the
  trainer's model-parallel group and an engine (NVLink inside a node, the NIC across nodes),
  at the stated sync efficiency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_rpt.model.flops import ModelFlops
from megatron_rpt.planning.cluster import ClusterSpec, PlanAssumptions


@dataclass(frozen=True, kw_only=True)
class Workload:
    """One step's sequences."""

    contexts: int
    samples: int
    """G responses per context."""
    prompt_tokens: int
    max_response_tokens: int
    mean_response_tokens: float
    shared_prefix: bool = True


@dataclass(frozen=True)
class StepTime:
    """Seconds per phase and the quantities they come from."""

    rollout_s: float
    train_s: float
    sync_s: float
    generated_tokens: int
    train_flops: float
    sync_bytes: int
    concurrent_sequences: int
    """Sequences one engine decodes at once (KV-cache bound)."""

    @property
    def total_s(self) -> float:
        """Rollout, training and sync run one after the other (colocated, on-policy)."""
        return self.rollout_s + self.train_s + self.sync_s


def rollout_seconds(
    flops: ModelFlops,
    work: Workload,
    cluster: ClusterSpec,
    assume: PlanAssumptions,
    *,
    engines: int,
    gpus_per_engine: int,
    concurrent_sequences: int,
) -> float:
    """Rollout phase time of the slowest engine (see the module docstring)."""
    groups = math.ceil(work.contexts / engines)
    prefill = groups * flops.prefill(work.prompt_tokens)
    prefill_s = prefill / (gpus_per_engine * cluster.peak_tflops * 1e12 * assume.mfu)
    efficiency = (
        1.0 if gpus_per_engine <= cluster.gpus_per_node else assume.cross_node_engine_efficiency
    )
    throughput = gpus_per_engine * assume.engine_tokens_per_s_per_gpu * efficiency
    throughput = min(throughput, max(concurrent_sequences, 1) * assume.engine_stream_tokens_per_s)
    tokens = groups * work.samples * work.mean_response_tokens
    tail = work.max_response_tokens / assume.engine_stream_tokens_per_s
    return prefill_s + max(tokens / throughput, tail)


def train_flops(
    flops: ModelFlops, work: Workload, *, prompt_passes: int, recompute: bool, extra: int
) -> float:
    """Training FLOPs of the step (the counter's per-sequence formula, see the docstring);
    ``prompt_passes``: times a group's prompt is computed (1 per micro-batch holding a part of
    the group with the shared-prefix layout, G with separate sequences)."""
    p, r = work.prompt_tokens, round(work.mean_response_tokens)
    one = flops.training(p, r, recompute=recompute, extra_forward_passes=extra)
    prompt_only = flops.training(p, 0, recompute=recompute, extra_forward_passes=extra)
    group = prompt_passes * prompt_only + work.samples * (one - prompt_only)
    return float(work.contexts * group)


def train_seconds(
    total_flops: float,
    cluster: ClusterSpec,
    assume: PlanAssumptions,
    *,
    pp: int,
    vpp: int | None,
    microbatches: int,
) -> float:
    """Training phase time on every GPU of the cluster, with the pipeline bubble."""
    ideal = total_flops / (cluster.world_size * cluster.peak_tflops * 1e12 * assume.mfu)
    bubble = (pp - 1) / ((vpp or 1) * max(microbatches, 1))
    return ideal * (1 + bubble)


def sync_seconds(
    model_bytes: int,
    cluster: ClusterSpec,
    assume: PlanAssumptions,
    *,
    model_parallel_gpus: int,
    gpus_per_engine: int,
) -> float:
    """Weight-sync time: model bytes over the slowest link on the way (see the docstring)."""
    in_node = max(model_parallel_gpus, gpus_per_engine) <= cluster.gpus_per_node
    link = cluster.intra_node_gbps if in_node else cluster.inter_node_gbps
    return model_bytes / (link * 1e9 * assume.sync_efficiency)


__all__ = [
    "StepTime",
    "Workload",
    "rollout_seconds",
    "sync_seconds",
    "train_flops",
    "train_seconds",
]
