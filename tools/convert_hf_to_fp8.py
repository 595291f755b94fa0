#!/usr/bin/env python
"""Write the blockwise FP8 copy of an HF model that an FP8-served SGLang engine starts from.

    python tools/convert_hf_to_fp8.py --hf-dir DIR --out-dir DIR [--block-size 128]
        [--pow2-scales] [--engine-tp 1] [--overwrite]

Decoder linear weights become float8_e4m3fn with fp32 ``*.weight_scale_inv`` per 128x128 block;
embeddings, lm_head, norms and biases are copied; config.json gets the ``quantization_config``
SGLang reads. Launch SGLang from the output with ``precision.rollout_fp8=true`` so that weight
syncs push the same format (megatron_rpt/weight_sync/fp8.py, docs/FP8.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_rpt.cli import FlagParser, run_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True, help="HF model directory or embedded:smollm2")
    parser.add_argument("--out-dir", required=True, help="FP8 model directory to create")
    parser.add_argument("--block-size", type=int, default=128, help="square block side")
    parser.add_argument(
        "--pow2-scales", action="store_true", help="power-of-two scales (scale_fmt ue8m0)"
    )
    parser.add_argument(
        "--engine-tp", type=int, default=1, help="SGLang TP size it will be served at"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out-dir")
    args = parser.parse_args(argv)
    from megatron_rpt.assets import resolve_model_path
    from megatron_rpt.weight_sync.fp8 import BlockFP8
    from megatron_rpt.weight_sync.fp8_checkpoint import write_fp8_checkpoint

    out = write_fp8_checkpoint(
        resolve_model_path(args.hf_dir),
        args.out_dir,
        BlockFP8(args.block_size, args.pow2_scales),
        engine_tp=args.engine_tp,
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
