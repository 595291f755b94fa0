#!/usr/bin/env python
"""Next-token accuracy by difficulty (RPT paper Table 1): standard argmax and next-token
reasoning, for one or more models on the same held-out positions.

Examples:
  # embedded default: SmolLM2 on the CHAMP validation split (prepare it first with
  # tools/prepare_rpt_data.py --out runs/data/champ); standard mode only
  python tools/eval_next_token.py --model base=embedded:smollm2 --data runs/data/champ \\
      --mode standard --out runs/eval/champ

  # base vs an RPT checkpoint, both modes, reasoning on 200 stratified positions
  python tools/eval_next_token.py --model base=/models/r1-14b --model rpt=runs/rpt/checkpoints \\
      --data runs/data/omnimath --entropy-model /models/r1-14b --engine sglang --out runs/eval/t1

  # any corpus, scored on the fly (every document is treated as held out)
  python tools/eval_next_token.py --model base=/models/policy --corpus data/heldout.jsonl \\
      --set data.text_field=content --out runs/eval/heldout

Writes <out>/eval.json (everything), <out>/table.md (the table) and <out>/accuracy.png.
--model takes NAME=PATH with PATH an HF directory, embedded:smollm2, or a Megatron checkpoint
(exported to a temporary HF directory). Every option below --model's group is an EvalConfig
field (megatron_rpt/eval/config.py); --set eval.<field>=... works too, as do prompt.* (chat
template, <think> opener), reward.require_think_close and rollout.sglang.* for the SGLang
engine.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")  # megatron on CPU

from megatron_rpt.cli import (  # noqa: E402
    add_config_options,
    config_option_overrides,
    doc_parser,
    run_cli,
)
from megatron_rpt.eval.config import EvalConfig  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """Fixed options plus one option per EvalConfig field (type, default and docstring)."""
    parser = doc_parser("eval_next_token.py", __doc__)
    add = parser.add_argument
    add("--model", action="append", default=[], metavar="NAME=PATH", required=True,
        help="a model to evaluate (repeatable; NAME labels its rows)")  # fmt: skip
    add("--data", metavar="DIR", help="prepared data directory (default: data.prepared_dir)")
    add(
        "--split",
        default="valid",
        choices=["valid", "train"],
        help="split of --data (default valid)",
    )
    add("--corpus", metavar="SPEC", help="evaluate this corpus instead, scored on the fly "
        "(any data.corpus value; data.* settings say how to read it)")  # fmt: skip
    add("--hf-config", metavar="DIR", help="HF model of Megatron-LM checkpoints without hf/")
    add("--out", metavar="DIR", default="runs/eval", help="output directory (default runs/eval)")
    add("--overwrite", action="store_true", help="replace --out if it exists")
    add("--recipe", metavar="MODULE:FN", help="recipe function returning an RPTConfig")
    add("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="dotted config override, e.g. eval.n_samples=4 or prompt.chat_template=false")  # fmt: skip
    add_config_options(parser, EvalConfig(), "evaluation options (EvalConfig fields)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, resolve models and positions, evaluate, write and print the report."""
    from megatron_rpt.config import build_config, resolve
    from megatron_rpt.eval.models import materialize, parse_model_args
    from megatron_rpt.eval.report import markdown_table, write_report
    from megatron_rpt.eval.runner import build_eval_set, eval_engine_factory, evaluate
    from megatron_rpt.fileio import check_output_dir

    args = build_parser().parse_args(argv)
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    fields = config_option_overrides(args, "eval")
    cfg = resolve(build_config(args.recipe, [*args.overrides, *fields]))  # as train.py
    refs = parse_model_args(args.model)
    out = check_output_dir(args.out, overwrite=args.overwrite)
    eval_set = build_eval_set(
        refs, cfg.eval, cfg.data, prepared_dir=args.data, split=args.split,
        corpus=args.corpus, hf_config=args.hf_config,
    )  # fmt: skip
    with materialize(refs, hf_config=args.hf_config) as models:
        run = evaluate(
            models, eval_set, cfg=cfg.eval, prompt=cfg.prompt,
            require_think_close=cfg.reward.require_think_close,
            engine_factory=eval_engine_factory(cfg.eval, cfg.rollout),
        )  # fmt: skip
        paths = write_report(
            run, out, models=models, overwrite=args.overwrite,
            extra={"argv": sys.argv[1:] if argv is None else list(argv),
                   "require_think_close": cfg.reward.require_think_close},
        )  # fmt: skip
    print(markdown_table(run))
    print(f"wrote {paths['eval.json']}, {paths['table.md']}, {paths['accuracy.png']} "
          f"({run.seconds:.1f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    run_cli(main)
