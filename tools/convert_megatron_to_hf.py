#!/usr/bin/env python
"""Export a Megatron checkpoint (converter, trainer or Megatron-LM torch_dist) as an HF model.

    python tools/convert_megatron_to_hf.py --megatron-dir DIR --out-dir DIR

Writes safetensors shards + config.json + tokenizer files that
transformers.AutoModelForCausalLM.from_pretrained loads. Works for checkpoints saved at any
TP/PP. A Megatron-LM directory has no HF config: pass --hf-config with the HF model it was
trained from. Single process; see megatron_rpt/checkpoint/megatron_to_hf.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_rpt.cli import FlagParser, run_cli  # noqa: E402
from megatron_rpt.errors import InputError  # noqa: E402


def _size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    for suffix, factor in units.items():
        if text.upper().endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--megatron-dir",
        required=True,
        help="checkpoint dir, a run's checkpoints dir (latest), or a Megatron-LM "
        "dir with latest_checkpointed_iteration.txt",
    )
    parser.add_argument("--out-dir", required=True, help="HF directory to create")
    parser.add_argument(
        "--hf-config",
        default=None,
        help="HF model dir giving config.json + tokenizer (needed only when the "
        "checkpoint has no hf/ folder, e.g. Megatron-LM checkpoints)",
    )
    parser.add_argument(
        "--max-shard-size",
        type=_size,
        default=_size("5GB"),
        help="largest safetensors shard, e.g. 2GB (default 5GB)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out-dir")
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("conversion runs in a single process; do not launch it with torchrun")
    from megatron_rpt.checkpoint.megatron_to_hf import convert_megatron_to_hf

    out = convert_megatron_to_hf(
        args.megatron_dir,
        args.out_dir,
        hf_config=args.hf_config,
        overwrite=args.overwrite,
        max_shard_bytes=args.max_shard_size,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
