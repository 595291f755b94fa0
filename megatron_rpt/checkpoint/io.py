"""Save and load the model part of a megatron_rpt checkpoint (collective over all ranks).

``save_checkpoint`` writes ``model/`` (dist_checkpointing, torch_dist: loads at any TP/PP/DP),
``hf/`` and ``metadata.json`` atomically, then the manifest; ``load_checkpoint`` loads a
checkpoint found by ``checkpoint.discovery.find_checkpoint`` into this rank's model chunks.
The layout and how checkpoints are found: ``checkpoint/discovery.py``.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megatron_rpt.checkpoint.discovery import (
    HF_DIR,
    METADATA_FILE,
    MODEL_DIR,
    CheckpointMetadata,
    ResolvedCheckpoint,
)
from megatron_rpt.conversion.hf_io import copy_side_files
from megatron_rpt.errors import CheckpointError
from megatron_rpt.fileio import atomic_output_dir, atomic_write_json
from megatron_rpt.model.manifest import verify_checkpoint, write_manifest
from megatron_rpt.model.parameters import unwrap_model
from megatron_rpt.model.safe_load import (
    LOAD_ERRORS,
    check_dcp_metadata,
    failure_message,
    safe_byte_entries,
)

if TYPE_CHECKING:  # checkpoint/loading.py imports this module
    from megatron_rpt.distributed import ParallelGroups
    from megatron_rpt.model.build import BuiltModel

logger = logging.getLogger(__name__)


def metadata_for(built: BuiltModel, groups: ParallelGroups, source: str) -> CheckpointMetadata:
    """Metadata of a checkpoint of ``built`` saved from the layout ``groups``."""
    return CheckpointMetadata(
        architecture=built.arch.hf_architecture,
        dtype=built.dtype,
        vocab_size=built.vocab.true,
        padded_vocab_size=built.vocab.padded,
        tensor_model_parallel_size=groups.tp_size,
        pipeline_model_parallel_size=groups.pp_size,
        source=source,
    )


# ----------------------------------------------------------------------------- save / load


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """The model's dist_checkpointing sharded state dict, in the layout this module saves.

    One chunk: the chunk's own dict; virtual pipeline chunks: ``{'model0': ..., ...}``.
    """
    if len(chunks) == 1:
        return unwrap_model(chunks[0]).sharded_state_dict()
    # Virtual pipeline chunks: Megatron-LM's layout ('model0', 'model1', ...); keys inside
    # are global, so any chunking loads any other.
    return {f"model{i}": unwrap_model(c).sharded_state_dict() for i, c in enumerate(chunks)}


def save_checkpoint(
    chunks: list[torch.nn.Module],
    path: str | Path,
    metadata: CheckpointMetadata,
    *,
    hf_source: Path | None,
    overwrite: bool = False,
    extra_writer: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint of the model (collective over all ranks), atomically.

    Rank 0 owns the temporary directory (renamed into place only after every rank saved) and
    writes ``hf/`` and ``metadata.json``. ``extra_writer(tmp_dir)`` runs on every rank after the
    model and before ``metadata.json`` (the trainer adds its optimizer and state there); if it
    raises on any rank, nothing appears at ``path``.
    """
    path = Path(path)
    try:
        _save(chunks, path, metadata, hf_source, overwrite, extra_writer)
    except CheckpointError:
        raise
    except LOAD_ERRORS as exc:  # disk full, permissions: one line naming the checkpoint
        raise CheckpointError(
            f"{path}: cannot save the checkpoint ({failure_message(exc)}); the previous "
            "checkpoint is intact"
        ) from None
    logger.info("saved checkpoint %s", path)
    return path


def _save(
    chunks: list[torch.nn.Module],
    path: Path,
    metadata: CheckpointMetadata,
    hf_source: Path | None,
    overwrite: bool,
    extra_writer: Callable[[Path], None] | None,
) -> None:
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    with _Rank0AtomicDir(path, overwrite) as tmp:
        tmp = Path(tmp)
        (tmp / MODEL_DIR).mkdir(exist_ok=True)
        dist_checkpointing.save(model_sharded_state_dict(chunks), str(tmp / MODEL_DIR))
        if extra_writer is not None:
            extra_writer(tmp)
        if rank == 0:
            if hf_source is not None:
                (tmp / HF_DIR).mkdir()
                copy_side_files(hf_source, tmp / HF_DIR)
            meta = dict(metadata.to_json(), created=_now())
            atomic_write_json(tmp / METADATA_FILE, meta)
    # manifest.json is written by _Rank0AtomicDir once every rank reported its files complete.


class _Rank0AtomicDir:
    """``atomic_output_dir`` on rank 0; its temporary path broadcast to the other ranks.

    Every rank reports success before rank 0 writes the manifest and renames the directory
    into place.
    """

    def __init__(self, path: Path, overwrite: bool) -> None:
        self.path, self.overwrite = path, overwrite
        self.holder: list[Any] = [None]
        self.ctx: Any = None

    def __enter__(self) -> str:
        failure: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                self.ctx = atomic_output_dir(self.path, overwrite=self.overwrite)
                self.holder[0] = str(self.ctx.__enter__())
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                failure[0] = str(exc)
        dist.broadcast_object_list(self.holder, src=0)
        dist.broadcast_object_list(failure, src=0)
        if failure[0] is not None:
            raise CheckpointError(failure[0])
        return self.holder[0]

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        # NCCL reduces only CUDA tensors; gloo (CPU runs) takes CPU ones.
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        ok = torch.tensor([0 if exc_type else 1], dtype=torch.int32, device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if dist.get_rank() == 0:
            if ok.item() == 1:
                try:
                    write_manifest(self.holder[0])  # every rank's files are complete now
                except Exception as error:
                    self.ctx.__exit__(type(error), error, None)
                    raise
                self.ctx.__exit__(None, None, None)
            else:
                error = exc or CheckpointError("checkpoint save failed on another rank")
                self.ctx.__exit__(type(error), error, None)
        if exc_type is None and ok.item() == 0:
            raise CheckpointError("checkpoint save failed on another rank")
        return False


def load_checkpoint(
    chunks: list[torch.nn.Module], ckpt: ResolvedCheckpoint, *, verify: bool = True
) -> None:
    """Load model weights from a resolved checkpoint into this rank's chunks (collective).

    Any saved TP/PP layout loads into any other. Keys the model needs but the checkpoint
    lacks, or tensors whose shapes differ, raise CheckpointError naming them. ``verify``:
    check the checkpoint's files against its manifest first (model/manifest.py).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    if verify:
        verify_checkpoint(ckpt.root if ckpt.kind == "megatron_rpt" else ckpt.model_dir)
    sharded = model_sharded_state_dict(chunks)
    check_shapes(sharded, ckpt.model_dir)
    try:
        with safe_byte_entries():
            state = dist_checkpointing.load(
                sharded, str(ckpt.model_dir), strict=StrictHandling.RAISE_UNEXPECTED
            )
    except LOAD_ERRORS as exc:
        raise CheckpointError(
            f"{ckpt.model_dir}: cannot load model weights: {failure_message(exc)}"
        ) from None
    if len(chunks) == 1:
        _load_module(unwrap_model(chunks[0]), state, ckpt)
    else:
        for i, chunk in enumerate(chunks):
            _load_module(unwrap_model(chunk), state[f"model{i}"], ckpt)


def _load_module(module: torch.nn.Module, state: dict[str, Any], ckpt: ResolvedCheckpoint) -> None:
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing:
        raise CheckpointError(f"{ckpt.model_dir}: checkpoint lacks model weights {missing[:5]}")


def check_shapes(sharded: dict[str, Any], model_dir: Path) -> None:
    """Compare the model's global tensor shapes with the checkpoint's, naming mismatches."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = _tensors_metadata(model_dir)
    for value in nested_values(sharded):
        if not isinstance(value, ShardedTensor):
            continue  # factories (SwiGLU fc1) are checked by the load itself
        if value.key not in saved:
            raise CheckpointError(f"{model_dir}: checkpoint has no tensor '{value.key}'")
        have = tuple(saved[value.key].global_shape)
        if have != tuple(value.global_shape):
            raise CheckpointError(
                f"{model_dir}: tensor '{value.key}' has shape {list(have)} in the checkpoint, "
                f"the model expects {list(value.global_shape)} (config and checkpoint disagree)"
            )


def _tensors_metadata(model_dir: Path) -> dict[str, Any]:
    """dist_checkpointing's tensor index, after ``.metadata`` passed the restricted unpickler."""
    from megatron.core import dist_checkpointing

    check_dcp_metadata(model_dir)
    try:
        return dist_checkpointing.load_tensors_metadata(str(model_dir))
    except Exception as exc:
        raise CheckpointError(
            f"{model_dir}: not a readable dist checkpoint: {failure_message(exc)}"
        ) from None


def checkpoint_tensor_info(model_dir: Path, key: str) -> tuple[tuple[int, ...], torch.dtype]:
    """Global shape and dtype of one tensor of a dist checkpoint (metadata only)."""
    saved = _tensors_metadata(model_dir)
    if key not in saved:
        raise CheckpointError(f"{model_dir}: checkpoint has no tensor '{key}'")
    return tuple(saved[key].global_shape), saved[key].dtype


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
