"""The checkpoint layout of megatron_rpt, and finding checkpoints: the one place that does.

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

What a run starts from: ``init_source`` (``--init-from``: an HF directory or a Megatron
checkpoint), ``policy_hf_dir`` (the HF directory with the policy's architecture and
tokenizer), ``resolve_resume`` (``--resume auto|none|PATH``) and ``checkpoint_step`` (the
optimizer steps a training checkpoint completed).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_rpt.assets import resolve_model_path
from megatron_rpt.errors import CheckpointError, ConfigError, InputError

if TYPE_CHECKING:
    from megatron_rpt.model.config import ModelConfig

FORMAT = "megatron_rpt.checkpoint"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
MODEL_DIR = "model"
HF_DIR = "hf"
LATEST_FILE = "latest"
MEGATRON_LM_TRACKER = "latest_checkpointed_iteration.txt"
STATE_FILE = "trainer_state.json"
"""A training checkpoint's step and loop state (written by trainer/checkpoint.py)."""


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


# ----------------------------------------------------------------------------- what a run loads


def init_source(path: str) -> str:
    """'hf' for an HF model directory, 'megatron' for a Megatron checkpoint (``--init-from``).

    ConfigError when ``path`` is neither.
    """
    p = Path(path).expanduser()
    if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        return "hf"
    try:
        find_checkpoint(p)
    except CheckpointError as exc:
        raise ConfigError(
            f"--init-from {path}: neither an HF model directory (config.json + *.safetensors) "
            f"nor a Megatron checkpoint ({exc})"
        ) from None
    return "megatron"


def policy_hf_dir(model: ModelConfig) -> Path:
    """HF directory giving the policy's architecture and tokenizer (errors name the setting)."""
    if model.megatron_checkpoint:
        try:
            ckpt = find_checkpoint(model.megatron_checkpoint)
        except CheckpointError as exc:
            raise ConfigError(f"model.megatron_checkpoint: {exc}") from None
        if ckpt.hf_dir is not None:
            return ckpt.hf_dir
    try:
        return resolve_model_path(model.hf_path)
    except InputError as exc:
        raise ConfigError(f"model.hf_path: {exc}") from None


def resolve_resume(resume: str, run_dir: str, load: str | None) -> Path | None:
    """The checkpoint to continue from for ``--resume auto|none|PATH`` (see the entry point):
    the run's own latest in ``<run.run_dir>/checkpoints``, else ``checkpoint.load``."""
    own_dir = Path(run_dir) / "checkpoints"
    if resume == "none":
        existing = _visible_entries(own_dir)
        if existing:
            raise ConfigError(
                f"--resume none, but run.run_dir={run_dir} already has checkpoints "
                f"({existing[-1]}); use --resume auto to continue it, or another run.run_dir"
            )
        return None
    if resume == "auto":
        own = _own_latest(own_dir)
        if own is not None:
            return own
        if load is None:
            return None
        resume = load
    try:
        return find_checkpoint(resume).root
    except CheckpointError as exc:
        raise ConfigError(f"--resume / checkpoint.load: {exc}") from None


def _visible_entries(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def _own_latest(checkpoints_dir: Path) -> Path | None:
    """The run's own newest checkpoint (``find_checkpoint``); None when the directory is empty.

    A directory with entries but no loadable checkpoint is an error, never a fresh start
    (which would overwrite and prune it).
    """
    if not _visible_entries(checkpoints_dir):
        return None  # hidden leftovers of an interrupted first save do not count
    try:
        return find_checkpoint(checkpoints_dir).root
    except CheckpointError as exc:
        raise ConfigError(
            f"{checkpoints_dir}: no complete checkpoint to resume from ({exc}); move it away "
            "or choose another run.run_dir"
        ) from None


def checkpoint_step(path: Path) -> int:
    """Optimizer steps a training checkpoint has completed."""
    try:
        return int(json.loads((path / STATE_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: not a training checkpoint ({exc})") from None
