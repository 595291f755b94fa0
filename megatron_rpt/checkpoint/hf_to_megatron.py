"""HF model directory -> megatron_rpt Megatron checkpoint (see checkpoint/discovery.py).

The model is built once at TP=1/PP=1 in this process (a 1-rank gloo group is created if
torch.distributed is not initialised), filled one parameter at a time from lazily-read
safetensors, and saved with Megatron's dist_checkpointing (``torch_dist``), which reshards on
load to any TP/PP/DP. Peak memory is about one copy of the model plus its largest tensor.

The output appears only when complete (``fileio.atomic_output_dir``); an existing target is
refused without ``overwrite``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from megatron_rpt.assets import resolve_model_path
from megatron_rpt.checkpoint.io import metadata_for, save_checkpoint
from megatron_rpt.checkpoint.loading import load_hf_weights
from megatron_rpt.conversion.hf_io import HFWeights
from megatron_rpt.distributed import (
    initialize_model_parallel,
    seed_model_parallel,
    single_process_group,
)
from megatron_rpt.dtypes import dtype_name, short_dtype
from megatron_rpt.errors import CheckpointError
from megatron_rpt.fileio import check_not_inside, check_output_dir
from megatron_rpt.model.arch import read_arch
from megatron_rpt.model.build import build_model
from megatron_rpt.model.config import ModelConfig, ParallelConfig

logger = logging.getLogger(__name__)


def source_dtype(weights: HFWeights) -> str:
    """'fp32' or 'bf16' when all floating tensors of the checkpoint share it, else an error."""
    dtypes = {weights.dtype(n) for n in weights.names() if weights.dtype(n).is_floating_point}
    if len(dtypes) == 1 and next(iter(dtypes)) in (torch.float32, torch.bfloat16):
        return short_dtype(dtype_name(next(iter(dtypes))))
    names = sorted(str(d).removeprefix("torch.") for d in dtypes)
    raise CheckpointError(
        f"{weights.dir}: weights are {names}; pass --dtype bf16 or --dtype fp32 to convert"
    )


def convert_hf_to_megatron(
    hf_path: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Convert an HF directory (or 'embedded:smollm2') into a Megatron checkpoint at ``out_dir``.

    ``dtype`` is 'auto' (the checkpoint's own, fp32 or bf16), 'fp32' or 'bf16'.
    """
    start = time.monotonic()
    hf_dir = resolve_model_path(str(hf_path))
    arch = read_arch(hf_dir)
    weights = HFWeights(hf_dir)
    out_dir = check_output_dir(out_dir, overwrite=overwrite)
    check_not_inside(out_dir, hf_dir, "--hf-dir")
    _check_json_side_files(hf_dir)
    if dtype == "auto":
        dtype = source_dtype(weights)
    if dtype not in ("fp32", "bf16"):
        raise CheckpointError(f"--dtype {dtype!r}: expected auto, fp32 or bf16")
    model_cfg = ModelConfig(hf_path=str(hf_dir), dtype=dtype, spec="local")  # type: ignore[arg-type]
    parallel = ParallelConfig()
    with single_process_group():
        groups = initialize_model_parallel(1, 1)
        seed_model_parallel(0, groups)
        built = build_model(arch, model_cfg, parallel, groups, initialize=False)
        load_hf_weights(built, hf_dir, groups, strict=True)
        metadata = metadata_for(built, groups, source=str(hf_dir))
        save_checkpoint(built.chunks, out_dir, metadata, hf_source=hf_dir, overwrite=overwrite)
        del built
    logger.info(
        "converted %s -> %s (%s) in %.1f s", hf_dir, out_dir, dtype, time.monotonic() - start
    )
    return out_dir


def _check_json_side_files(hf_dir: Path) -> None:
    """A broken tokenizer.json (or other JSON side file) fails here, not at training time."""
    for path in sorted(Path(hf_dir).glob("*.json")):
        try:
            json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
