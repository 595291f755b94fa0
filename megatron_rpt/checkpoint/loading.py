"""Build a model for this rank and fill it with pretrained weights (HF or Megatron checkpoint).

``build_pretrained(model_cfg, parallel, groups)`` is the entry point for training and
evaluation. The initial weights come from

* ``model_cfg.megatron_checkpoint`` (any TP/PP it was saved at; resharded by Megatron's
  dist_checkpointing; its padded vocabulary is kept), or else
* ``model_cfg.hf_path``: each rank reads only the HF tensors of its own parameters, lazily, one
  parameter at a time, converts them with the name table and keeps its TP shard.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_rpt.assets import resolve_model_path
from megatron_rpt.checkpoint.discovery import ResolvedCheckpoint, find_checkpoint
from megatron_rpt.checkpoint.io import checkpoint_tensor_info, load_checkpoint
from megatron_rpt.conversion.converter import WeightConverter
from megatron_rpt.conversion.hf_io import HFWeights
from megatron_rpt.conversion.tp_sharding import partitioning, tp_shard
from megatron_rpt.distributed import ParallelGroups
from megatron_rpt.errors import CheckpointError, ConfigError
from megatron_rpt.model.arch import ArchSpec, read_arch
from megatron_rpt.model.build import BuiltModel, build_model
from megatron_rpt.model.config import ModelConfig, ParallelConfig, PrecisionConfig
from megatron_rpt.model.parameters import named_global_parameters

logger = logging.getLogger(__name__)

EMBEDDING_KEY = "embedding.word_embeddings.weight"
# HF tensors that carry no weights of their own (recomputed buffers in old checkpoints).
_IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class ModelSource:
    """Where a model's architecture, tokenizer and initial weights come from."""

    arch: ArchSpec
    hf_dir: Path
    checkpoint: ResolvedCheckpoint | None
    padded_vocab: int | None


def resolve_source(model_cfg: ModelConfig, hf_config: str | None = None) -> ModelSource:
    """Resolve ``model_cfg`` (and an optional HF config dir for bare Megatron-LM checkpoints)."""
    if not model_cfg.megatron_checkpoint:
        hf_dir = resolve_model_path(model_cfg.hf_path)
        return ModelSource(read_arch(hf_dir), hf_dir, None, None)
    ckpt = find_checkpoint(model_cfg.megatron_checkpoint)
    hf_dir = ckpt.hf_dir or resolve_model_path(hf_config or model_cfg.hf_path)
    arch = read_arch(hf_dir)
    if ckpt.hf_dir is not None and hf_config is None and model_cfg.hf_path != ModelConfig.hf_path:
        other = read_arch(resolve_model_path(model_cfg.hf_path))
        if _shape_fields(other) != _shape_fields(arch):
            raise ConfigError(
                f"model.hf_path={model_cfg.hf_path} describes a different model than the "
                f"checkpoint's {ckpt.hf_dir / 'config.json'}"
            )
    if ckpt.metadata is not None:
        padded = ckpt.metadata.padded_vocab_size
    else:
        padded = checkpoint_tensor_info(ckpt.model_dir, EMBEDDING_KEY)[0][0]
    return ModelSource(arch, hf_dir, ckpt, padded)


def _shape_fields(arch: ArchSpec) -> tuple:
    return (
        arch.family,
        arch.hidden_size,
        arch.num_layers,
        arch.num_attention_heads,
        arch.num_kv_heads,
        arch.head_dim,
        arch.intermediate_size,
        arch.vocab_size,
    )


def build_pretrained(
    model_cfg: ModelConfig,
    parallel: ParallelConfig,
    groups: ParallelGroups,
    *,
    output: str = "logits",
    precision: PrecisionConfig | None = None,
) -> BuiltModel:
    """Build this rank's chunks and load the initial weights (collective over all ranks).

    ``output='hidden'`` builds the trainer's ``RPTGPTModel`` (see ``build_model``);
    ``precision`` switches on FP8 training (weights are loaded in ``model.dtype`` either way).
    """
    source = resolve_source(model_cfg)
    # Megatron sets the TP attributes of a parameter (tensor_model_parallel, partition_dim,
    # partition_stride) only inside its init functions; DDP, grad-norm and the TP sharding
    # below rely on them, so skip the (overwritten) random init only when TP is 1.
    built = build_model(
        source.arch,
        model_cfg,
        parallel,
        groups,
        padded_vocab=source.padded_vocab,
        initialize=groups.tp_size > 1,
        output=output,
        precision=precision,
    )
    built.hf_dir = source.hf_dir
    if source.checkpoint is not None:
        load_checkpoint(built.chunks, source.checkpoint)
    else:
        load_hf_weights(built, source.hf_dir, groups)
    return built


@torch.no_grad()
def load_hf_weights(
    built: BuiltModel, hf_dir: Path, groups: ParallelGroups, *, strict: bool | None = None
) -> set[str]:
    """Copy HF weights into this rank's parameters (its TP shard of each); return HF names used.

    ``strict`` (default: when this rank holds the whole model) also fails on HF tensors the
    model did not use, which means the config.json does not describe the weights.
    """
    reader = HFWeights(hf_dir)
    converter = WeightConverter(built.arch, built.vocab.padded)
    used: set[str] = set()
    for name, param in named_global_parameters(built.chunks):
        part = partitioning(param)
        full_shape = list(param.shape)
        if part is not None:
            full_shape[part[0]] *= groups.tp_size
        full = converter.hf_to_megatron(name, _tracking(reader, used), expected_shape=full_shape)
        if part is not None:
            full = tp_shard(full, part[0], part[1], groups.tp_rank, groups.tp_size)
        assert full.shape == param.shape, (name, full.shape, param.shape)
        param.copy_(full)
        del full
    if strict is None:
        strict = groups.tp_size == 1 and groups.pp_size == 1
    if strict:
        _check_all_used(reader, used, built.arch)
    return used


def _tracking(reader: HFWeights, used: set[str]):  # noqa: ANN202
    def fetch(name: str) -> torch.Tensor:
        used.add(name)
        return reader.get(name)

    return fetch


def _check_all_used(reader: HFWeights, used: set[str], arch: ArchSpec) -> None:
    unused = [
        n
        for n in reader.names()
        if n not in used
        and not n.endswith(_IGNORED_HF_SUFFIXES)
        and not (arch.tie_word_embeddings and n == "lm_head.weight")
    ]
    if unused:
        raise CheckpointError(
            f"{reader.file_of(unused[0])}: tensors {unused[:5]} are not used by "
            f"{arch.hf_architecture} as configured in config.json (does the config match?)"
        )
