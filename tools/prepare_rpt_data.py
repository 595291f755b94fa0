#!/usr/bin/env python
"""Prepare RPT data: read a corpus, tokenise it with the policy's tokenizer, score every position
with a proxy LM's top-k entropy, and keep the high-entropy positions as training samples.

Examples:
  # embedded default: CHAMP problems + solutions, SmolLM2 as tokenizer and proxy
  python tools/prepare_rpt_data.py --out runs/data/champ

  # your own corpus (JSONL with a "content" field), your policy's tokenizer, a small proxy
  # model that shares that tokenizer
  python tools/prepare_rpt_data.py --corpus data/my.jsonl --text-field content \\
      --tokenizer /models/policy --entropy-model /models/proxy --out runs/data/mine

Precedence: DataConfig defaults < --recipe < --set data.<key>=<value> < the options below.
Every option is a field of DataConfig (megatron_rpt/data/config.py); the help text is the
field's docstring. The output layout is described in megatron_rpt/data/pipeline.py.
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
from megatron_rpt.data.config import DataConfig  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """Options generated from DataConfig's fields (type, default and docstring)."""
    parser = doc_parser("prepare_rpt_data.py", __doc__)
    parser.add_argument(
        "--out", metavar="DIR", default=None, help="output directory (default: data.prepared_dir)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it exists (only once the new data is complete)",
    )
    parser.add_argument(
        "--recipe",
        metavar="MODULE:FN",
        help="recipe function returning an RPTConfig (module:fn or file.py:fn)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted config override, e.g. data.entropy_top_k=8",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the scoring progress bar")
    add_config_options(parser, DataConfig(), "data options (DataConfig fields)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, build the config, prepare the data, print the summary."""
    from megatron_rpt.config import build_config, resolve
    from megatron_rpt.data.pipeline import prepare_data

    args = build_parser().parse_args(argv)
    logging.getLogger("megatron.core").setLevel(logging.WARNING)  # IndexedDataset chatter
    fields = config_option_overrides(args, "data")
    cfg = resolve(build_config(args.recipe, [*args.overrides, *fields]))  # as train.py
    out = Path(args.out or cfg.data.prepared_dir)
    summary = prepare_data(
        cfg.data, out, overwrite=args.overwrite, progress=False if args.no_progress else None
    )
    print(f"prepared {out}")
    print(summary.format_table(tuple(cfg.data.difficulty_thresholds)))
    return 0


if __name__ == "__main__":
    run_cli(main)
