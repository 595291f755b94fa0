#!/usr/bin/env python
"""Plan an RPT run on a cluster: per-GPU memory and step time, before any GPU is used.

Examples:
  # the 14B recipe on 4 nodes of 8 H100 (architecture from the model's config.json)
  python tools/plan_run.py --recipe examples/r1_distill_qwen_14b/config.py:r1_distill_qwen_14b \\
      --arch /models/DeepSeek-R1-Distill-Qwen-14B --preset h100 --nodes 4

  # one engine instead of one per rollout.gpus_per_engine GPUs; step time at 16 and 64 nodes
  python tools/plan_run.py --recipe ... --arch ... --preset h100 --nodes 4 --engines 1 \\
      --scale-nodes 16,64

  # a stated engine throughput and MFU; exit status 1 when the plan does not fit
  python tools/plan_run.py --recipe ... --arch ... --engine-tokens-per-s-per-gpu 2500 --mfu 0.4 \\
      --strict

Prints the memory per GPU (trainer parameters, gradients, optimizer state, activations,
log-prob buffers; engine weights and KV cache; the peak with and without the colocated
hand-off) and the step time split into rollout, training and weight sync, then whether it
fits and, if not, the setting to change. --arch takes an HF directory or a config.json;
without it the architecture comes from model.hf_path. Formulas and assumptions:
docs/SCALING.md (megatron_rpt/planning/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megatron_rpt.cli import add_config_options, doc_parser, run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    from megatron_rpt.planning import ClusterSpec, PlanAssumptions

    parser = doc_parser("plan_run.py", __doc__)
    add = parser.add_argument
    add("--recipe", help="recipe function: module:function or file.py:function")
    add("--config", help="YAML file with config values (after the recipe)")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    add("--arch", metavar="HF_DIR|CONFIG_JSON", help="model architecture (default: model.hf_path)")
    add("--preset", choices=["h100", "h200"], help="GPU preset (memory, peak); flags override it")
    add("--engines", type=int, help="rollout engines (default: all GPUs / rollout.gpus_per_engine)")
    add("--scale-nodes", metavar="N,N,...", help="also print step time at these node counts")
    add("--strict", action="store_true", help="exit with status 1 when the plan does not fit")
    add_config_options(parser, ClusterSpec(), "cluster (ClusterSpec fields)")
    add_config_options(parser, PlanAssumptions(), "assumptions (PlanAssumptions fields)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point (see the module docstring)."""
    import dataclasses

    from megatron_rpt.config import build_config, resolve
    from megatron_rpt.config_utils import apply_overrides
    from megatron_rpt.planning import ClusterSpec, PlanAssumptions, format_plan, plan_run
    from megatron_rpt.planning.cluster import PRESETS
    from megatron_rpt.planning.plan import format_scaling, read_plan_arch

    args = build_parser().parse_args(argv)
    cfg = resolve(build_config(args.recipe, args.set, args.config))  # as the entry point
    cluster = ClusterSpec(**PRESETS.get(args.preset or "", {}))
    assume = PlanAssumptions()
    given = {k[len("field_") :]: v for k, v in vars(args).items() if k.startswith("field_") and v}
    for obj in (cluster, assume):
        names = {f.name for f in dataclasses.fields(obj)}
        apply_overrides(obj, [f"{k}={v}" for k, v in given.items() if k in names])
    arch = read_plan_arch(cfg, args.arch)
    plan = plan_run(cfg, arch, cluster, assume, engines=args.engines)
    print(format_plan(plan, cluster, assume))  # noqa: T201 - CLI output
    if args.scale_nodes:
        nodes = [int(n) for n in args.scale_nodes.split(",") if n.strip()]
        print(format_scaling(cfg, arch, cluster, assume, nodes, engines=args.engines))  # noqa: T201
    return 1 if args.strict and not plan.fits else 0


if __name__ == "__main__":
    run_cli(main)
