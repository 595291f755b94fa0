"""Files for tools/gpu_check.sh: what travels to the GPU machine, and what is built there.

    python tools/gpu_check_assets.py pack .whl/gpu
        (here, by `make gpu-wheels`) copy the SmolLM2 tokenizer and config (not its 538 MB of
        weights) into .whl/gpu/smollm2-tokenizer/ and check every file is < 64 MiB; prints
        the folder's total size.
    python tools/gpu_check_assets.py random-model SRC OUT [--tiny]
        (there) a random-initialised model with SRC's config.json and tokenizer (``--tiny``:
        2 layers of width 64, for the CPU dry run), written as safetensors into OUT.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_rpt.cli import FlagParser  # noqa: E402

LIMIT = 64 * 2**20
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json",
                   "generation_config.json", "chat_template.jinja")  # fmt: skip
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}  # fmt: skip


def pack(dest: Path) -> int:
    """Tokenizer + config of the embedded SmolLM2 into ``dest/smollm2-tokenizer``; size check."""
    from megatron_rpt.assets import smollm2_dir

    src, out = smollm2_dir(), dest / "smollm2-tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    files = [p for p in dest.rglob("*") if p.is_file()]
    big = [f"{p} ({p.stat().st_size / 2**20:.1f} MiB)" for p in files if p.stat().st_size >= LIMIT]
    total = sum(p.stat().st_size for p in files)
    print(f"{dest}: {len(files)} files, {total / 2**20:.1f} MiB in all")
    for p in sorted(files):
        print(f"  {p.stat().st_size / 2**20:7.2f} MiB  {p.relative_to(dest)}")
    if big:
        print(f"files of 64 MiB or more cannot travel: {big}", file=sys.stderr)
        return 1
    return 0


def random_model(src: Path, out: Path, tiny: bool) -> int:
    """Random-init model of ``src``'s architecture (+ its tokenizer) into ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((src / "config.json").read_text())
    if tiny:
        cfg |= TINY
    config = AutoConfig.for_model(**cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    print(f"wrote a random {cfg.get('architectures', ['?'])[0]} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params) to {out}")
    return 0


def main() -> int:
    p = FlagParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("dest", type=Path)
    b = sub.add_parser("random-model")
    b.add_argument("src", type=Path)
    b.add_argument("out", type=Path)
    b.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    if args.cmd == "pack":
        return pack(args.dest)
    return random_model(args.src, args.out, args.tiny)


if __name__ == "__main__":
    sys.exit(main())
