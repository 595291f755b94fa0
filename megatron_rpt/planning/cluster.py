"""The cluster a run is planned for, and the stated throughput assumptions.

Every number the planner cannot derive from the config and the architecture is a field here,
with the value used when nothing is stated; ``tools/plan_run.py`` prints them with the plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rpt.errors import ConfigError

GiB = 1024**3


@dataclass(kw_only=True)
class ClusterSpec:
    """Nodes of identical GPUs."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    """Usable device memory per GPU (H100 SXM: 80 GB = 74.5 GiB usable is typical)."""
    peak_tflops: float = 989.0
    """Dense peak of the training precision per GPU (H100/H200 BF16: 989; FP8: 1979)."""
    intra_node_gbps: float = 400.0
    """GB/s one GPU moves to another in its node (NVLink 4: ~400 of the 450 per direction)."""
    inter_node_gbps: float = 50.0
    """GB/s per GPU between nodes (one 400 Gb/s NIC per GPU)."""

    @property
    def world_size(self) -> int:
        """GPUs in the cluster."""
        return self.nodes * self.gpus_per_node

    def check(self) -> None:
        """Positive sizes; errors name the field."""
        for name in ("nodes", "gpus_per_node", "gpu_memory_gib", "peak_tflops",
                     "intra_node_gbps", "inter_node_gbps"):  # fmt: skip
            if not getattr(self, name) > 0:
                raise ConfigError(f"cluster.{name} must be > 0, got {getattr(self, name)}")


PRESETS = {
    # BF16 dense peak; usable memory as torch reports it (80 GB / 141 GB parts).
    "h100": dict(gpus_per_node=8, gpu_memory_gib=79.6, peak_tflops=989.0),
    "h200": dict(gpus_per_node=8, gpu_memory_gib=139.8, peak_tflops=989.0),
}


@dataclass(kw_only=True)
class PlanAssumptions:
    """Throughputs and efficiencies the planner is told, not measures."""

    mfu: float = 0.35
    """Model FLOPs utilisation of the training phase (forward + backward), pipeline bubble
    excluded (the planner adds it)."""
    engine_tokens_per_s_per_gpu: float = 1500.0
    """Aggregate decode throughput of a rollout engine per GPU it spans, at full batch."""
    engine_stream_tokens_per_s: float = 60.0
    """Decode speed of one sequence (the longest response bounds the rollout: the tail)."""
    cross_node_engine_efficiency: float = 0.3
    """Throughput factor of an engine whose tensor parallelism spans nodes."""
    sync_efficiency: float = 0.1
    """Achieved fraction of the link bandwidth during weight sync (conversion, per-tensor
    loaders and serialisation dominate measured colocated syncs)."""
    mean_response_fraction: float = 0.5
    """Mean response length / rollout.max_new_tokens (timing; memory uses the maximum)."""
    prompt_template_tokens: int = 256
    """Instruction + chat template around data.context_tokens."""
    overhead_gib: float = 4.0
    """Per-GPU memory not in any tensor the planner counts: CUDA context, NCCL buffers,
    allocator fragmentation, CUDA graphs of the engine."""
    extra_forward_passes: int = 0
    """Forward-only passes per step besides the trained one (old/reference log-probs)."""

    def check(self) -> None:
        """Ranges; errors name the field."""
        for name in ("mfu", "cross_node_engine_efficiency", "sync_efficiency",
                     "mean_response_fraction"):  # fmt: skip
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(
                    f"assumptions.{name} must be in (0, 1], got {getattr(self, name)}"
                )
        for name in ("engine_tokens_per_s_per_gpu", "engine_stream_tokens_per_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"assumptions.{name} must be > 0")


__all__ = ["PRESETS", "GiB", "ClusterSpec", "PlanAssumptions"]
