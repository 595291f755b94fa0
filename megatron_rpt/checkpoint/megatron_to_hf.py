"""Megatron checkpoint -> HF directory (safetensors shards + config.json + tokenizer).

Accepts what ``checkpoint.discovery.find_checkpoint`` accepts: a converter or trainer
checkpoint saved at any TP/PP, a run's checkpoints directory (its latest), or a Megatron-LM
``torch_dist`` directory (which carries no HF config: pass ``hf_config``).

The checkpoint is loaded (resharded by dist_checkpointing) into one TP=1/PP=1 model in this
process; the HF tensors are then streamed parameter by parameter through the name table
straight into pre-laid-out safetensors shards, so memory stays at about one model copy. The
exported ``config.json`` is the source one with the true vocabulary size and the exported
dtype; vocabulary padding rows are dropped. The output appears only when complete.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from megatron_rpt.checkpoint.discovery import find_checkpoint
from megatron_rpt.checkpoint.io import checkpoint_tensor_info, load_checkpoint
from megatron_rpt.checkpoint.loading import EMBEDDING_KEY, resolve_source
from megatron_rpt.conversion.converter import WeightConverter
from megatron_rpt.conversion.hf_io import SafetensorsShardWriter, copy_side_files
from megatron_rpt.distributed import (
    initialize_model_parallel,
    seed_model_parallel,
    single_process_group,
)
from megatron_rpt.dtypes import canonical_dtype, dtype_name, short_dtype
from megatron_rpt.errors import CheckpointError
from megatron_rpt.fileio import (
    atomic_output_dir,
    atomic_write_json,
    check_not_inside,
    check_output_dir,
)
from megatron_rpt.model.arch import ArchSpec
from megatron_rpt.model.build import build_model
from megatron_rpt.model.config import ModelConfig, ParallelConfig
from megatron_rpt.model.manifest import verify_checkpoint
from megatron_rpt.model.parameters import named_global_parameters

logger = logging.getLogger(__name__)


def convert_megatron_to_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    hf_config: str | Path | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Export a Megatron checkpoint as an HF model directory at ``out_dir``."""
    start = time.monotonic()
    ckpt = find_checkpoint(checkpoint)
    out_dir = check_output_dir(out_dir, overwrite=overwrite)
    check_not_inside(out_dir, ckpt.root, "--megatron-dir")
    verify_checkpoint(ckpt.root if ckpt.kind == "megatron_rpt" else ckpt.model_dir)
    if ckpt.hf_dir is None and hf_config is None:
        raise CheckpointError(
            f"{ckpt.root}: checkpoint has no hf/config.json; pass --hf-config DIR (the HF "
            "model it was trained from) to name its architecture and tokenizer"
        )
    source = resolve_source(
        ModelConfig(megatron_checkpoint=str(ckpt.root)),
        None if hf_config is None else str(hf_config),
    )
    if ckpt.metadata is not None:
        dtype = ckpt.metadata.dtype
    else:
        saved = checkpoint_tensor_info(ckpt.model_dir, EMBEDDING_KEY)[1]
        dtype = short_dtype(dtype_name(saved)) if saved == torch.bfloat16 else "fp32"
    model_cfg = ModelConfig(dtype=dtype, spec="local")  # type: ignore[arg-type]
    with single_process_group():
        groups = initialize_model_parallel(1, 1)
        seed_model_parallel(0, groups)
        built = build_model(
            source.arch,
            model_cfg,
            ParallelConfig(),
            groups,
            padded_vocab=source.padded_vocab,
            initialize=False,
        )
        load_checkpoint(built.chunks, ckpt, verify=False)
        with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
            write_hf_dir(
                built.chunks,
                source.arch,
                built.vocab.padded,
                dtype,
                source.hf_dir,
                tmp,
                max_shard_bytes=max_shard_bytes,
            )
        del built
    logger.info("exported %s -> %s in %.1f s", ckpt.root, out_dir, time.monotonic() - start)
    return out_dir


def write_hf_dir(
    chunks: list[torch.nn.Module],
    arch: ArchSpec,
    padded_vocab: int,
    dtype: str,
    hf_source: Path,
    out: Path,
    *,
    max_shard_bytes: int = 5 * 2**30,
) -> list[Path]:
    """Stream a full (TP=1, PP=1) model's weights into HF files in ``out`` (+ config, tokenizer)."""
    converter = WeightConverter(arch, padded_vocab)
    params = list(named_global_parameters(chunks))
    plan = converter.hf_plan((name, tuple(p.shape), p.dtype) for name, p in params)
    writer = SafetensorsShardWriter(out, plan, max_shard_bytes=max_shard_bytes)
    writer.write_all(converter.iter_hf_weights(params))
    files = writer.finish()
    config = json.loads((hf_source / "config.json").read_text())
    config["vocab_size"] = arch.vocab_size
    config["architectures"] = [arch.hf_architecture]
    config["dtype"] = canonical_dtype(dtype)  # HF's spelling
    if "torch_dtype" in config:
        config["torch_dtype"] = canonical_dtype(dtype)
    atomic_write_json(out / "config.json", config)
    copy_side_files(hf_source, out, skip={"config.json"})
    return files
