#!/usr/bin/env python
"""Fit next-token accuracy against training compute, P(C) = A / C^alpha + P*, per difficulty
bucket (RPT paper Sec. 4.2), and plot points and fits on a log-scale compute axis.

Examples:
  # from the trainer's metrics (lines with eval/reasoning/{easy,medium,hard} are the points;
  # compute = flops/train_cumulative + flops/rollout_cumulative)
  python tools/fit_scaling.py --metrics runs/rpt/metrics.jsonl --out runs/scaling

  # from eval results of several checkpoints, each with its cumulative training FLOPs
  python tools/fit_scaling.py --point 1.2e20=runs/eval/step100/eval.json \\
      --point 2.4e20=runs/eval/step200/eval.json ... --model rpt --series reasoning

Writes <out>/scaling.json (A, alpha, P*, R^2, standard errors, the points), <out>/scaling.md and
<out>/scaling.png. The fit and the input formats are described in megatron_rpt/eval/scaling.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megatron_rpt.cli import doc_parser, run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = doc_parser("fit_scaling.py", __doc__)
    add = parser.add_argument
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--metrics", metavar="JSONL", help="trainer metrics.jsonl")
    src.add_argument("--point", action="append", metavar="FLOPS=EVAL_JSON",
                     help="an eval.json of tools/eval_next_token.py and its training FLOPs (repeatable)")  # fmt: skip
    add("--compute", default="total", choices=["total", "train", "rollout"],
        help="--metrics: which FLOPs are C (default total = train + rollout)")  # fmt: skip
    add("--accuracy-key", default="eval/reasoning/{bucket}",
        help="--metrics: accuracy field, {bucket} = easy/medium/hard (default %(default)s)")  # fmt: skip
    add("--train-key", default="flops/train_cumulative", help="--metrics: training FLOPs field")
    add("--rollout-key", default="flops/rollout_cumulative", help="--metrics: rollout FLOPs field")
    add("--model", help="--point: which model's rows (needed when a file holds several)")
    add("--series", default="reasoning",
        help="--point: standard, reasoning (Random@1) or reasoning_pass@K (default reasoning)")  # fmt: skip
    add("--title", default="Next-token accuracy vs training compute", help="plot title")
    add("--out", metavar="DIR", default="runs/scaling", help="output directory")
    add("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def _points(args: argparse.Namespace):  # noqa: ANN202
    from megatron_rpt.errors import InputError
    from megatron_rpt.eval.scaling import read_eval_points, read_metrics_jsonl

    if args.metrics:
        return read_metrics_jsonl(
            args.metrics, compute=args.compute, accuracy_key=args.accuracy_key,
            train_key=args.train_key, rollout_key=args.rollout_key,
        )  # fmt: skip
    pairs = []
    for item in args.point:
        flops, sep, path = item.partition("=")
        try:
            pairs.append((float(flops), path))
        except ValueError:
            raise InputError(
                f"--point {item}: expected FLOPS=EVAL_JSON, e.g. 1.5e20=eval.json"
            ) from None
        if not sep or not path:
            raise InputError(f"--point {item}: expected FLOPS=EVAL_JSON")
    return read_eval_points(pairs, model=args.model, series=args.series)


def main(argv: list[str] | None = None) -> int:
    """Read the points, fit every bucket, write and print the results."""
    from megatron_rpt.eval.scaling import fit_all, fits_table, write_scaling_report
    from megatron_rpt.fileio import check_output_dir

    args = build_parser().parse_args(argv)
    check_output_dir(args.out, overwrite=args.overwrite)
    points = _points(args)
    fits = fit_all(points)
    source = {k: v for k, v in vars(args).items() if k not in ("out", "overwrite")}
    paths = write_scaling_report(points, fits, args.out, title=args.title, source=source,
                                 overwrite=args.overwrite)  # fmt: skip
    print(fits_table(fits))
    print(f"wrote {paths['scaling.json']}, {paths['scaling.md']}, {paths['scaling.png']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
