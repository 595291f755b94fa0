#!/usr/bin/env python
"""Convert an HF model directory (Llama / Qwen2 / Qwen3) into a Megatron checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir DIR --out-dir DIR [--dtype bf16|fp32]

The output (model/ torch_dist dist checkpoint, hf/ config + tokenizer, metadata.json) loads at
any TP/PP/DP. Single process; see megatron_rpt/checkpoint/hf_to_megatron.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_rpt.cli import FlagParser, run_cli  # noqa: E402
from megatron_rpt.errors import InputError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--hf-dir",
        required=True,
        help="HF model directory (config.json + safetensors) or embedded:smollm2",
    )
    parser.add_argument("--out-dir", required=True, help="checkpoint directory to create")
    parser.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="parameter dtype of the checkpoint (default: the HF weights' own)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out-dir")
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("conversion runs in a single process; do not launch it with torchrun")
    from megatron_rpt.checkpoint.hf_to_megatron import convert_hf_to_megatron

    out = convert_hf_to_megatron(
        args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
