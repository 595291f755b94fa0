"""The Megatron checkpoint layout of megatron_rpt, and finding checkpoints to load.

A checkpoint directory (written by tools/convert_hf_to_megatron.py and, with more entries, by
the trainer)::

    <ckpt>/
      metadata.json    format version, architecture, dtype, true/padded vocabulary, the TP/PP
                       it was saved at, its source (a directory without it is not a checkpoint)
      manifest.json    size and CRC-32 blocks of every other file, written last and checked
                       before any load (model/manifest.py)
      model/           Megatron dist_checkpointing save (torch_dist, fully reshardable) of the
                       model's sharded_state_dict: loads at any TP/PP/DP
      hf/              config.json, tokenizer files, generation_config.json of the source model
      optimizer/ ...   (trainer checkpoints only: trainer/checkpoint.py adds optimizer/, rng/
                       and trainer_state.json through save_checkpoint's ``extra_writer``)

A *checkpoints directory* of a run holds several of these; the one to resume from is named in
its ``latest`` file, else it is the complete sub-directory with the highest trailing number.

Megatron-LM training directories are accepted too: ``latest_checkpointed_iteration.txt``
names ``iter_NNNNNNN/`` (or ``release/``), which must be in the ``torch_dist`` format (its
model tensors load directly; optimizer entries are ignored). The architecture must then come
from an HF config given separately. Legacy ``mp_rank_XX/model_optim_rng.pt`` pickles are
refused with a clear error: loading them needs unpickling arbitrary objects; convert them with
Megatron-LM's own tools (``--ckpt-convert-format torch_dist``) first.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megatron_rpt.errors import CheckpointError
from megatron_rpt.fileio import atomic_output_dir, atomic_write_json
from megatron_rpt.model.manifest import verify_checkpoint, write_manifest
from megatron_rpt.model.safe_load import (
    LOAD_ERRORS,
    check_dcp_metadata,
    failure_message,
    safe_byte_entries,
)

if TYPE_CHECKING:  # model/loading.py (above model/build.py) imports this module
    from megatron_rpt.distributed import ParallelGroups
    from megatron_rpt.model.build import BuiltModel

logger = logging.getLogger(__name__)

FORMAT = "megatron_rpt.checkpoint"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
MODEL_DIR = "model"
HF_DIR = "hf"
LATEST_FILE = "latest"
MEGATRON_LM_TRACKER = "latest_checkpointed_iteration.txt"


@dataclass(frozen=True)
class CheckpointMetadata:
    """Contents of ``metadata.json``."""

    architecture: str
    dtype: str
    vocab_size: int
    padded_vocab_size: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    source: str
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    created: str = ""

    def to_json(self) -> dict[str, Any]:
        """Plain dict for metadata.json."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Where the parts of a checkpoint are (``find_checkpoint``)."""

    root: Path
    model_dir: Path
    hf_dir: Path | None
    metadata: CheckpointMetadata | None
    kind: str
    """'megatron_rpt' or 'megatron_lm'."""


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


def read_metadata(ckpt_dir: Path) -> CheckpointMetadata:
    """Parse ``<ckpt>/metadata.json``; errors name the file."""
    path = ckpt_dir / METADATA_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint metadata: {exc}") from None
    if data.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a megatron_rpt checkpoint (format {data.get('format')!r})"
        )
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {data['format_version']} is newer than this code "
            f"({FORMAT_VERSION})"
        )
    known = set(CheckpointMetadata.__dataclass_fields__)
    try:
        return CheckpointMetadata(**{k: v for k, v in data.items() if k in known})
    except TypeError as exc:
        raise CheckpointError(f"{path}: incomplete checkpoint metadata: {exc}") from None


def is_checkpoint(path: Path) -> bool:
    """A complete megatron_rpt checkpoint directory (metadata.json is written last)."""
    return (path / METADATA_FILE).is_file() and (path / MODEL_DIR).is_dir()


def find_checkpoint(path: str | Path) -> ResolvedCheckpoint:
    """Resolve a checkpoint, a run's checkpoints dir (its latest) or a Megatron-LM dir."""
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(f"{root}: checkpoint not found")
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    if is_checkpoint(root):
        hf = root / HF_DIR
        return ResolvedCheckpoint(
            root, root / MODEL_DIR, hf if hf.is_dir() else None, read_metadata(root), "megatron_rpt"
        )
    if (root / MEGATRON_LM_TRACKER).is_file():
        return _megatron_lm(root)
    if _is_dist_checkpoint(root):
        return ResolvedCheckpoint(root, root, None, None, "megatron_lm")
    _refuse_legacy(root)
    latest = _latest_in_run_dir(root)
    if latest is not None:
        return find_checkpoint(latest)
    raise CheckpointError(
        f"{root}: not a checkpoint (no {METADATA_FILE} + {MODEL_DIR}/), a checkpoints directory "
        f"or a Megatron-LM directory ({MEGATRON_LM_TRACKER})"
    )


def _is_dist_checkpoint(path: Path) -> bool:
    return (path / "metadata.json").is_file() and (path / ".metadata").is_file()


def _refuse_legacy(path: Path) -> None:
    legacy = sorted(path.glob("mp_rank_*/model_optim_rng.pt"))
    if legacy:
        raise CheckpointError(
            f"{legacy[0]}: legacy Megatron-LM checkpoint format (pickled model_optim_rng.pt) is "
            "not supported; convert it to torch_dist with Megatron-LM "
            "(--ckpt-convert-format torch_dist) first"
        )


def _megatron_lm(root: Path) -> ResolvedCheckpoint:
    tracker = root / MEGATRON_LM_TRACKER
    text = tracker.read_text().strip()
    if text == "release":
        sub = root / "release"
    elif text.isdigit():
        sub = root / f"iter_{int(text):07d}"
    else:
        raise CheckpointError(f"{tracker}: expected an iteration number or 'release', got {text!r}")
    if not sub.is_dir():
        raise CheckpointError(f"{tracker}: names {sub.name}, which does not exist")
    _refuse_legacy(sub)
    if not _is_dist_checkpoint(sub):
        raise CheckpointError(f"{sub}: not a torch_dist checkpoint (no metadata.json/.metadata)")
    return ResolvedCheckpoint(root, sub, None, None, "megatron_lm")


def _latest_in_run_dir(root: Path) -> Path | None:
    named = root / LATEST_FILE
    if named.is_file():
        try:
            name = named.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{named}: cannot read ({exc})") from None
        if not name or name in (".", "..") or Path(name).name != name:
            raise CheckpointError(
                f"{named}: must name a checkpoint directory inside {root}, got {name!r}"
            )
        target = root / name
        if target.is_symlink() or not is_checkpoint(target):
            raise CheckpointError(
                f"{named}: names {target.name}, which is not a complete checkpoint"
            )
        return target
    candidates = [p for p in root.iterdir() if not p.name.startswith(".") and is_checkpoint(p)]
    if not candidates:
        return None

    def order(p: Path) -> tuple[int, str]:
        match = re.search(r"(\d+)$", p.name)
        return (int(match.group(1)) if match else -1, p.name)

    return max(candidates, key=order)


# ----------------------------------------------------------------------------- save / load


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """The model's dist_checkpointing sharded state dict, in the layout this module saves.

    One chunk: the chunk's own dict; virtual pipeline chunks: ``{'model0': ..., ...}``.
    """
    from megatron_rpt.conversion.converter import unwrap_model

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

    from megatron_rpt.conversion.hf_io import copy_side_files

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

    from megatron_rpt.conversion.converter import unwrap_model

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
