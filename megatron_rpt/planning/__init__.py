"""Memory and step-time planning for an RPT run on a described cluster (before any GPU is used).

* ``cluster``: the cluster description (nodes, GPUs, memory, peak FLOP/s, bandwidths) and the
  stated throughput/efficiency assumptions;
* ``memory``: per-GPU memory of the trainer (parameters, gradients, optimizer state under
  TP/PP/DP/CP and the distributed optimizer; activations with or without recompute, SP, CP;
  the fused log-prob buffers) and of the colocated rollout engine (weights, KV cache);
* ``timing``: step time split into rollout, training and weight sync;
* ``plan``: ``plan_run(cfg, arch, cluster)`` combining both from an ``RPTConfig``, the table
  ``tools/plan_run.py`` prints, and ``check_fit`` (the trainer's GPU preflight).

Depends on the config dataclasses, ``model.arch`` and the FLOP counter (``model.flops``) only.
The formulas and their assumptions are in docs/SCALING.md.
"""

from megatron_rpt.planning.cluster import ClusterSpec, PlanAssumptions
from megatron_rpt.planning.plan import RunPlan, check_fit, format_plan, plan_run

__all__ = ["ClusterSpec", "PlanAssumptions", "RunPlan", "check_fit", "format_plan", "plan_run"]
