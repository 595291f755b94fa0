#!/usr/bin/env python
"""RPT vs RLP vs the NTP control (and the base model) side by side on the same held-out data:
next-token accuracy by difficulty, held-out perplexity, and the FLOPs each run spent.

Example (the embedded default; docs/EVAL.md has the runs that produce these directories):
  python tools/compare_objectives.py --model base=embedded:smollm2 \\
      --model rpt=runs/cmp/rpt --model rlp=runs/cmp/rlp --model ntp=runs/cmp/ntp \\
      --data runs/data/champ-20 --out runs/eval/objectives

--model takes NAME=PATH with PATH a training run directory (evaluated at its latest
checkpoint; its metrics.jsonl gives the FLOPs and its config.yaml the objective) or a model
(HF directory, embedded:smollm2). Writes <out>/compare.json and <out>/compare.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")  # megatron on CPU

from megatron_rpt.cli import doc_parser, run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command's options."""
    parser = doc_parser("compare_objectives.py", __doc__)
    add = parser.add_argument
    add("--model", action="append", required=True, metavar="NAME=PATH",
        help="a run directory or model to compare (repeatable)")  # fmt: skip
    add("--data", required=True, metavar="DIR", help="prepared data directory (its valid split)")
    add("--out", default="runs/eval/objectives", metavar="DIR", help="output directory")
    add("--window", type=int, default=256, help="perplexity window in tokens (default 256)")
    add("--recipe", metavar="MODULE:FN", help="recipe function returning an RPTConfig")
    add("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="dotted config override, e.g. eval.max_positions=200")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    """Evaluate every model, write and print the table."""
    from megatron_rpt.config import build_config, resolve
    from megatron_rpt.eval.compare import compare_runs, markdown, write_comparison
    from megatron_rpt.eval.models import parse_model_args

    args = build_parser().parse_args(argv)
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    cfg = resolve(build_config(args.recipe, args.overrides))  # as train.py
    models = [(ref.name, ref.path) for ref in parse_model_args(args.model)]
    entries = compare_runs(
        models, args.data, eval_cfg=cfg.eval, data_cfg=cfg.data, prompt=cfg.prompt,
        window_tokens=args.window,
    )  # fmt: skip
    paths = write_comparison(entries, args.out)
    print(markdown(entries))
    print(f"wrote {paths['compare.json']} and {paths['compare.md']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
