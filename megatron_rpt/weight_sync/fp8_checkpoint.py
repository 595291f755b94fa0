"""Write the blockwise FP8 HF checkpoint an FP8-served SGLang engine starts from.

SGLang decides at launch whether a model is FP8 (``quantization_config`` in config.json) and
allocates FP8 parameters plus ``weight_scale_inv`` tensors accordingly; every later weight sync
with ``precision.rollout_fp8`` then pushes tensors of exactly those names, shapes and dtypes.
``write_fp8_checkpoint`` produces that starting point from a bf16/fp32 HF folder (the policy's
initial weights): the same quantization as the sync (``weight_sync/fp8.py``), tensors read one
at a time and written into pre-laid-out safetensors shards, the other files copied, all inside
an atomic output directory. ``tools/convert_hf_to_fp8.py`` is its CLI.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from megatron_rpt.conversion.hf_io import HFWeights, SafetensorsShardWriter, copy_side_files
from megatron_rpt.fileio import atomic_output_dir
from megatron_rpt.weight_sync.fp8 import BlockFP8, check_servable

logger = logging.getLogger(__name__)


def write_fp8_checkpoint(
    hf_dir: str | Path,
    out_dir: str | Path,
    quantization: BlockFP8 | None = None,
    *,
    engine_tp: int = 1,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Quantize ``hf_dir``'s decoder linear weights into ``out_dir`` (see module docstring).

    ``engine_tp``: the SGLang tensor-parallel size the checkpoint will be served at (the block
    divisibility check depends on it; ConfigError when SGLang could not load it).
    """
    quantization = quantization or BlockFP8()
    reader = HFWeights(hf_dir)
    names = reader.names()
    shapes = {n: reader.shape(n) for n in names}
    check_servable(shapes, quantization, engine_tp)
    plan = [
        spec for n in names for spec in quantization.output_specs(n, shapes[n], reader.dtype(n))
    ]
    not_converted = [n for n in names if not quantization.quantizes(n, shapes[n])]
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    config["quantization_config"] = quantization.quantization_config(not_converted)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        writer = SafetensorsShardWriter(tmp, plan, max_shard_bytes)
        for name in names:
            writer.write_all(quantization.quantize(name, reader.get(name)))
        writer.finish()
        copy_side_files(hf_dir, tmp, skip=["config.json"])
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    quantized = len(names) - len(not_converted)
    logger.info(
        "wrote FP8 checkpoint %s: %d of %d tensors in %dx%d FP8 blocks (+ weight_scale_inv)",
        out_dir, quantized, len(names), quantization.block_size, quantization.block_size,
    )  # fmt: skip
    return Path(out_dir)


__all__ = ["write_fp8_checkpoint"]
